"""Foreign model formats are recognised, and the refusal says what was found and what to do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from experts.errors import InvalidExpertError
from experts.hf.foreign import check_not_foreign


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _gguf(d: Path) -> None:
    (d / "model.safetensors").unlink()
    (d / "tiny-q4_k_m.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)


def _gguf_renamed(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"GGUF" + b"\x00" * 64)


def _quant_config(method: dict) -> object:
    def change(d: Path) -> None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["quantization_config"] = method
        (d / "config.json").write_text(json.dumps(cfg))
    return change


def _gptq_tensors(d: Path) -> None:
    save_file({"transformer.h.0.attn.c_attn.qweight": torch.zeros(4, 4, dtype=torch.int32),
               "transformer.h.0.attn.c_attn.scales": torch.zeros(4)}, str(d / "model.safetensors"))


def _pickled(d: Path) -> None:
    (d / "model.safetensors").rename(d / "pytorch_model.bin")


@pytest.mark.parametrize("change,words", [
    (_gguf, ["GGUF file (tiny-q4_k_m.gguf)", "safetensors model"]),
    (_gguf_renamed, ["GGUF file (model.safetensors)"]),
    (_quant_config({"quant_method": "gptq", "bits": 4}), ["quant_method 'gptq'", "full-precision", "dequantise"]),
    (_quant_config({"quant_method": "awq", "bits": 4}), ["quant_method 'awq'"]),
    (_quant_config({"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}), ["quant_method 'bitsandbytes'"]),
    (_gptq_tensors, ["GPTQ/AWQ", "qweight", "config.json does not say so"]),
    (_pickled, ["pickled", "pytorch_model.bin", "safe_serialization=True"]),
])
def test_foreign_inputs_are_named_with_what_to_do(tiny_model_dir, tmp_path, change, words):
    d = _copy(tiny_model_dir, tmp_path / "m")
    change(d)
    with pytest.raises(InvalidExpertError) as e:
        check_not_foreign(d)
    for w in words:
        assert w in str(e.value)


def test_plain_models_and_pickles_next_to_safetensors_pass(tiny_model_dir, tmp_path):
    check_not_foreign(tiny_model_dir)
    d = _copy(tiny_model_dir, tmp_path / "m")
    (d / "pytorch_model.bin").write_bytes(b"not read")  # a hub repo with both: the safetensors are used
    check_not_foreign(d)
    with pytest.raises(InvalidExpertError, match="GGUF"):  # an upload that dropped the file still says so
        check_not_foreign(tiny_model_dir, dropped=["weights/model-Q8_0.gguf"])
