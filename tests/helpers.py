"""Test helpers: tiny local models (no downloads) and a real gateway process on 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ADMIN_KEY = "test-admin-key"
CLIENT_KEY = "test-client-key"


def training_text() -> list[str]:
    import pydoc_data.topics

    return [v for _, v in sorted(pydoc_data.topics.topics.items())]


def build_tokenizer(vocab_size: int = 400):
    from experts.hf.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(training_text(), vocab_size=vocab_size)


def build_model_dir(out: Path, *, tokenizer=None, n_layer: int = 2, n_embd: int = 64, n_positions: int = 128,
                    seed: int = 0, vocab_size: int = 400) -> Path:
    """Save a random-initialised tiny GPT-2 with a locally trained tokenizer as an HF directory."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tokenizer or build_tokenizer(vocab_size)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, vocab_size=len(tok), n_positions=n_positions,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def wait_until(predicate, timeout: float = 10.0, every: float = 0.02) -> bool:
    """Poll `predicate` until it holds or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


class FakeClock:
    """A monotonic clock a test moves by hand (`clock.t += 1.0`)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """`mergegate serve` in a subprocess; stops itself."""

    def __init__(self, data_dir: Path, *, api_keys: str = "", admin_key: str | None = ADMIN_KEY,
                 extra_env: dict[str, str] | None = None, command: tuple[str, ...] = ("serve",)) -> None:
        self.command = command
        self.data_dir = data_dir
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "MERGEGATE_API_KEYS": api_keys,
                    "MERGEGATE_LOG_LEVEL": "warning", **(extra_env or {})}
        self.env.pop("MERGEGATE_ADMIN_KEY", None)
        if admin_key is not None:
            self.env["MERGEGATE_ADMIN_KEY"] = admin_key
        self.admin_key = admin_key
        self.proc: subprocess.Popen | None = None
        self.log = data_dir.parent / f"gateway-{self.port}.log"

    def start(self, timeout: float = 90.0) -> Gateway:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        logf = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *self.command,
             "--port", str(self.port), "--data-dir", str(self.data_dir)],
            cwd=ROOT, env=self.env, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited early:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("gateway did not start in time")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    @property
    def admin_headers(self) -> dict[str, str]:
        key = self.admin_key or (self.data_dir / "admin.key").read_text().strip()
        return {"Authorization": f"Bearer {key}"}

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.admin_headers, timeout=120)

    def register(self, expert_id: str, path: Path, **extra) -> dict:
        with self.admin() as c:
            r = c.post("/admin/experts", json={"id": expert_id, "path": str(path), **extra})
            assert r.status_code == 201, r.text
            return r.json()


def build_adapter_dir(out: Path, base_dir: Path, *, rank: int = 4, seed: int = 0,
                      targets: tuple[str, ...] = ("c_attn",)) -> Path:
    """A PEFT LoRA adapter for the model in `base_dir`, with random (non-zero) A and B."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  lora_dropout=0.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    return out


def rewrite_safetensors_header(path: Path, change) -> None:
    """Apply `change(header)` to a safetensors file's JSON header, keeping its data bytes as they are."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])


def poison_weights(path: Path, name_part: str) -> None:
    """Fill the first tensor whose name contains `name_part` with NaN (a structurally valid file)."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    name = next(k for k in tensors if name_part in k)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(path), metadata={"format": "pt"})
