"""`lora` experts: a PEFT LoRA adapter on a registered base expert.

Validation builds the base on the `meta` device, attaches the adapter's LoRA config with peft,
and compares the adapter file's tensors (names and shapes) with the LoRA parameters peft
creates, so a rank, target-module or base mismatch is refused before anything is written.
Serving loads the base, applies the adapter and merges it into the weights (one dense model,
so generation costs the same as the base).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from experts.errors import InvalidExpertError
from experts.hf.loading import LoadedModel, load_hf_model, model_nbytes
from experts.hf.validation import read_safetensors_header

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    rank: int
    lora_alpha: float
    target_modules: list[str]
    num_params: int
    dtype: str
    size_bytes: int


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def _file_key(peft_name: str) -> str:
    return peft_name.replace(".default", "")


def validate_adapter_dir(adapter_dir: Path, base_dir: Path) -> AdapterInfo:
    """Raise InvalidExpertError unless `adapter_dir` is a LoRA adapter that fits the model in `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise InvalidExpertError("adapter_config.json is missing")
    if not weights.is_file():
        raise InvalidExpertError("adapter_model.safetensors is missing (pickled adapters are not accepted)")
    try:
        raw = json.loads(cfg_path.read_text())
        if raw.get("peft_type", "LORA") != "LORA":
            raise InvalidExpertError(f"adapter type {raw.get('peft_type')!r} is not LoRA")
        known = set(LoraConfig.__dataclass_fields__)
        skip = ("peft_type", "base_model_name_or_path")
        lcfg = LoraConfig(**{k: v for k, v in raw.items() if k in known and k not in skip})
    except (ValueError, TypeError) as e:
        raise InvalidExpertError(f"adapter_config.json is not a valid LoRA config: {e}") from None
    header = read_safetensors_header(weights)
    base_cfg = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(base_cfg), lcfg)
    expected = {_file_key(n): tuple(p.shape) for n, p in model.named_parameters() if "lora_" in n}
    found = {k: tuple(v["shape"]) for k, v in header.items()}
    if set(found) != set(expected):
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise InvalidExpertError(
            f"the adapter does not fit the base model: unexpected tensors {extra[:3]}, missing tensors {missing[:3]} "
            "(different base architecture or target_modules?)")
    for k, shape in expected.items():
        if found[k] != shape:
            raise InvalidExpertError(f"the adapter does not fit the base model: {k} has shape {found[k]}, the base "
                                     f"and rank {lcfg.r} imply {shape}")
    dtypes = {v["dtype"] for v in header.values()}
    dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(next(iter(dtypes)), "float32")
    targets = sorted(lcfg.target_modules) if lcfg.target_modules is not None else []
    size = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    return AdapterInfo(lcfg.r, float(lcfg.lora_alpha), list(targets),
                       sum(torch.Size(s).numel() for s in found.values()), dtype, size)


def load_lora_model(adapter_dir: Path, base_dir: Path, *, dtype: str | None = None) -> LoadedModel:
    from peft import PeftModel

    base = load_hf_model(base_dir, dtype=dtype)
    merged: Any = PeftModel.from_pretrained(base.model, adapter_dir).merge_and_unload()
    merged.eval()
    merged.requires_grad_(False)
    return LoadedModel(merged, base.tokenizer, model_nbytes(merged))
