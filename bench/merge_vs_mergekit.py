"""MergeGate's tensor-by-tensor merge vs mergekit on the same files: wall time and peak RSS.

4 experts (+ a base) of a ~100M-parameter GPT-2 configuration with random weights, created
locally; methods linear, ties, dare_ties. Each merge runs in its own process so peak RSS is
that merge's alone; libraries are imported before the clock starts, on both sides. The physical
floor is (bytes read + bytes written) / memory bandwidth measured in the same run (a large
tensor copy).

    .venv/bin/python bench/merge_vs_mergekit.py [--layers 12 --embd 768 --vocab 32000]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "linear": ({"normalize": True}, {"weight": 0.25}),
    "ties": ({"normalize": True, "lambda": 1.0}, {"weight": 0.25, "density": 0.3}),
    "dare_ties": ({"normalize": False, "lambda": 1.0}, {"weight": 0.25, "density": 0.3}),
}


def make_models(root: Path, layers: int, embd: int, vocab: int) -> list[Path]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=layers, n_embd=embd, n_head=12, vocab_size=vocab, n_positions=1024,
                     bos_token_id=0, eos_token_id=0)
    paths = []
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg)
    for i in range(5):
        d = root / f"m{i}"
        if i:
            with torch.no_grad():
                for p in base.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        base.save_pretrained(d)
        paths.append(d)
    return paths


def child_ours(method: str, base: str, experts: list[str], out: str) -> None:
    sys.path.insert(0, str(ROOT))
    from experts.hf.st_writer import StreamingSafetensorsWriter
    from merging.apply import merge_tensors
    from merging.recipe import MergeRecipe
    from merging.sources import SafetensorsSource, tensor_meta

    params, per = METHODS[method]
    recipe = MergeRecipe.model_validate({
        "method": method, "base": base if method != "linear" else None, "parameters": params, "seed": 0,
        "experts": [{"id": e, **per} for e in experts], "dtype": "float32"})
    sources = {p: SafetensorsSource(p) for p in ([base] if method != "linear" else []) + experts}
    ref = sources[base if method != "linear" else experts[0]]
    layout = [(k, tuple(tensor_meta(ref, k)[0]), tensor_meta(ref, k)[1])
              for k in ref.keys()]  # noqa: SIM118 (a TensorSource, not a dict)
    Path(out).mkdir(parents=True, exist_ok=True)
    with StreamingSafetensorsWriter(Path(out) / "model.safetensors", layout) as w:
        for name, t in merge_tensors(recipe, sources):
            w.write(name, t)


def child_mergekit(method: str, base: str, experts: list[str], out: str) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    params, per = METHODS[method]
    cfg = {"merge_method": method, "parameters": params, "dtype": "float32",
           "models": [{"model": e, "parameters": per} for e in experts]}
    if method != "linear":
        cfg["base_model"] = base
    run_merge(MergeConfiguration.model_validate(cfg), out,
              options=MergeOptions(copy_tokenizer=False, quiet=True, random_seed=0))


def run_child(tool: str, method: str, base: Path, experts: list[Path], out: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one merge in a fresh process."""
    args = [sys.executable, __file__, "--child", tool, method, str(base), str(out)] + [str(e) for e in experts]
    os.sync()  # start each side with no dirty pages left by the previous one (writes are disk-throttled)
    t0 = time.perf_counter()
    res = subprocess.run(args + ["--report"], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-2000:])
    wall = time.perf_counter() - t0
    info = json.loads(res.stdout.strip().splitlines()[-1])
    return info["seconds"], info["rss_mib"], wall


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: per address space, so not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bandwidth_gbs() -> float:
    import torch

    a = torch.empty(256 << 20, dtype=torch.uint8).fill_(1)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        dt = time.perf_counter() - t0
        best = max(best, 2 * a.numel() / dt / 1e9)  # read + write
    return best


def disk_write_s(root: Path, size: int) -> float:
    """Seconds to write `size` bytes to a new file in `root` and fsync it (best of 2): every merge
    writes its output, so this is a floor neither tool can beat."""
    chunk = memoryview(bytes(64 << 20))
    best = float("inf")
    for i in range(2):
        os.sync()
        path = root / f"disk-floor-{i}"
        t0 = time.perf_counter()
        with path.open("wb") as f:
            left = size
            while left > 0:
                left -= f.write(chunk[:min(left, len(chunk))])
            f.flush()
            os.fsync(f.fileno())
        best = min(best, time.perf_counter() - t0)
        path.unlink()
    return best


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        tool, method, base, out, *experts = [a for a in sys.argv[i + 1:] if a != "--report"]
        # Libraries are imported before the clock starts, on both sides: a gateway has them loaded, and
        # importing torch alone takes ~1.5 s here, which would dwarf a linear merge.
        sys.path.insert(0, str(ROOT))
        mods = ("experts.hf.st_writer", "merging.apply", "merging.recipe", "merging.sources") \
            if tool == "mergegate" else ("mergekit.config", "mergekit.merge")
        for mod in mods:
            importlib.import_module(mod)
        t0 = time.perf_counter()
        (child_ours if tool == "mergegate" else child_mergekit)(method, base, experts, out)
        secs = time.perf_counter() - t0
        rss = peak_rss_mib()
        print(json.dumps({"seconds": secs, "rss_mib": rss}))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--methods", default="linear,ties,dare_ties")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mg-mergebench-") as tmp:  # ~3-5 GB of models and outputs
        run_all(Path(tmp), args)


def run_all(root: Path, args: argparse.Namespace) -> None:
    paths = make_models(root, args.layers, args.embd, args.vocab)
    base, experts = paths[0], paths[1:]
    size = (base / "model.safetensors").stat().st_size
    bw = bandwidth_gbs()
    disk = disk_write_s(root, size)
    print(f"4 experts + base, {size / 1e6:.0f} MB each (fp32); memory bandwidth {bw:.1f} GB/s (copy); "
          f"writing + fsyncing one output: {disk:.2f} s ({size / disk / 1e9:.2f} GB/s)\n")
    print(f"{'method':10s}{'mergegate s':>12s}{'mergekit s':>12s}{'speed-up':>10s}{'MG RSS MiB':>12s}"
          f"{'MK RSS MiB':>12s}{'RSS ratio':>10s}{'floor s':>9s}{'MG/floor':>9s}{'disk s':>8s}")
    for method in args.methods.split(","):
        reads = (len(experts) + (method != "linear")) * size
        floor = (reads + size) / (bw * 1e9)
        mg_s, mg_rss, _ = run_child("mergegate", method, base, experts, root / f"out-mg-{method}")
        mk_s, mk_rss, _ = run_child("mergekit", method, base, experts, root / f"out-mk-{method}")
        print(f"{method:10s}{mg_s:12.2f}{mk_s:12.2f}{mk_s / mg_s:9.2f}x{mg_rss:12.0f}{mk_rss:12.0f}"
              f"{mg_rss / mk_rss:9.2f}x{floor:9.2f}{mg_s / floor:8.1f}x{disk:8.2f}")


if __name__ == "__main__":
    main()
