"""Recognise model formats MergeGate does not take, so that registration says what it found and what to do.

MergeGate reads full-precision Hugging Face safetensors directories: weights it can average, stream and
serve with transformers. Refused here, before any other check:

* GGUF files (llama.cpp; magic ``b"GGUF"``, whatever the file is called);
* quantised checkpoints: a ``quantization_config`` in config.json (GPTQ, AWQ, bitsandbytes, FP8, ...) or
  quantisation tensors in the safetensors files (``qweight``/``qzeros``/``g_idx``, bitsandbytes ``absmax``);
* pickled weights (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``, ``*.pkl``) without safetensors:
  unpickling can run code, so they are never read.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from experts.errors import InvalidExpertError
from experts.hf.validation import read_safetensors_header

__all__ = ["check_not_foreign"]

GGUF_MAGIC = b"GGUF"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensor-name endings that only quantised checkpoints have: GPTQ/AWQ packed weights, bitsandbytes states
QUANT_TENSORS = {".qweight": "GPTQ/AWQ", ".qzeros": "GPTQ/AWQ", ".g_idx": "GPTQ", ".absmax": "bitsandbytes",
                 ".quant_map": "bitsandbytes", ".quant_state.bitsandbytes__nf4": "bitsandbytes",
                 ".quant_state.bitsandbytes__fp4": "bitsandbytes", ".SCB": "bitsandbytes (8-bit)"}
_DEQUANTISE = ("register the original full-precision model (float32, float16 or bfloat16 safetensors) instead, "
               "or dequantise it first (load it with transformers and save_pretrained a dequantised copy)")
_CONVERT = ("convert it to safetensors on a trusted machine (AutoModelForCausalLM.from_pretrained(dir)"
            ".save_pretrained(out, safe_serialization=True)) and register that")


def _gguf(files: list[Path], names: list[str]) -> str | None:
    for f in files:
        try:
            with f.open("rb") as fh:
                if fh.read(4) == GGUF_MAGIC:
                    return f.name
        except OSError:
            continue
    return next((n for n in names if n.lower().endswith(".gguf")), None)


def _quant_method(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None  # a missing or broken config is reported by validation itself
    q = config.get("quantization_config") if isinstance(config, dict) else None
    if not q:
        return None
    if not isinstance(q, dict):
        return "unknown"
    if q.get("load_in_4bit") or q.get("load_in_8bit"):
        return "bitsandbytes"
    return str(q.get("quant_method") or "unknown")


def _quant_tensors(files: list[Path]) -> tuple[str, str] | None:
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            header = read_safetensors_header(f)
        except InvalidExpertError:
            return None  # structural problems are reported by validation itself
        for name in header:
            for ending, kind in QUANT_TENSORS.items():
                if name.endswith(ending):
                    return kind, name
    return None


def check_not_foreign(model_dir: Path, dropped: Iterable[str] = ()) -> None:
    """Raise InvalidExpertError when ``model_dir`` (plus files an upload already ``dropped``, by name) holds a
    GGUF file, a quantised checkpoint or only pickled weights; the message says what to do instead."""
    files = sorted(p for p in model_dir.iterdir() if p.is_file()) if model_dir.is_dir() else []
    names = [p.name for p in files] + [Path(d).name for d in dropped]
    found = _gguf(files, names)
    if found:
        raise InvalidExpertError(
            f"found a GGUF file ({found}): that is llama.cpp's (usually quantised) format, which MergeGate "
            "cannot merge or serve; register the Hugging Face safetensors model it was made from, or convert "
            "it back (transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...).save_pretrained(out))")
    method = _quant_method(model_dir)
    if method:
        raise InvalidExpertError(
            f"config.json has a quantization_config (quant_method {method!r}): quantised weights cannot be "
            f"merged or served here; {_DEQUANTISE}")
    tensors = _quant_tensors(files)
    if tensors:
        raise InvalidExpertError(
            f"the weights are quantised ({tensors[0]}: tensor {tensors[1]!r}) although config.json does not "
            f"say so; {_DEQUANTISE}")
    pickled = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickled and not any(n.endswith(".safetensors") for n in names):
        raise InvalidExpertError(
            f"found only pickled weights ({', '.join(pickled[:3])}): pickled .bin/.pt weights are not "
            f"accepted, as loading a pickle can run code; {_CONVERT}")
