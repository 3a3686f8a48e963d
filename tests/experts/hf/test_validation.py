"""Broken models are refused before registration: safetensors headers are checked entry by entry, and a
one-token smoke forward (finite logits) runs before a registration commits."""

from __future__ import annotations

import shutil

import pytest

from experts.errors import InvalidExpertError
from experts.hf.smoke import smoke_test_adapter, smoke_test_model
from experts.hf.validation import is_model_file, read_safetensors_header, validate_model_dir
from tests.helpers import build_adapter_dir, poison_weights, rewrite_safetensors_header


def _by_offset(h: dict) -> list[str]:
    return sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])


def _overlap(h: dict) -> None:
    first, second = _by_offset(h)[:2]
    size = h[second]["data_offsets"][1] - h[second]["data_offsets"][0]
    start = h[first]["data_offsets"][1] - 4  # the second tensor starts inside the first
    h[second]["data_offsets"] = [start, start + size]


def _unknown_dtype(h: dict) -> None:
    h[_by_offset(h)[0]]["dtype"] = "F99"


def _wrong_size(h: dict) -> None:
    name = _by_offset(h)[0]
    h[name]["dtype"] = "F16"  # the span stays that of F32: twice what the shape needs


def _negative(h: dict) -> None:
    h[_by_offset(h)[0]]["data_offsets"] = [-4, 0]


def _bool_shape(h: dict) -> None:
    h[_by_offset(h)[0]]["shape"] = [True]


@pytest.mark.parametrize("change, words", [
    (_overlap, "overlap"), (_unknown_dtype, "unknown dtype 'F99'"), (_wrong_size, "needs"),
    (_negative, "corrupt data_offsets"), (_bool_shape, "corrupt shape"),
])
def test_bad_safetensors_headers_are_refused(tiny_model_dir, tmp_path, change, words):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    rewrite_safetensors_header(bad / "model.safetensors", change)
    with pytest.raises(InvalidExpertError, match=words):
        validate_model_dir(bad)


def test_a_truncated_file_names_the_tensor_that_reaches_past_its_end(tiny_model_dir, tmp_path):
    p = tmp_path / "model.safetensors"
    p.write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(InvalidExpertError, match="reaches past the end of the file.*truncated"):
        read_safetensors_header(p)


def test_sound_files_still_pass(tiny_model_dir):
    header = read_safetensors_header(tiny_model_dir / "model.safetensors")
    assert header and all(e["dtype"] == "F32" for e in header.values())
    assert validate_model_dir(tiny_model_dir).num_params > 0


def test_nan_weights_pass_validation_but_fail_the_smoke_forward(tiny_model_dir, tmp_path):
    smoke_test_model(tiny_model_dir)  # a sound model passes
    bad = tmp_path / "nan"
    shutil.copytree(tiny_model_dir, bad)
    poison_weights(bad / "model.safetensors", "wte")
    validate_model_dir(bad)  # structurally fine
    with pytest.raises(InvalidExpertError, match="not finite"):
        smoke_test_model(bad)


def test_a_nan_adapter_fails_the_smoke_forward_on_its_base(tiny_model_dir, tmp_path):
    adapter = build_adapter_dir(tmp_path / "adapter", tiny_model_dir)
    smoke_test_adapter(adapter, tiny_model_dir)
    poison_weights(adapter / "adapter_model.safetensors", "lora_B")
    with pytest.raises(InvalidExpertError, match="not finite"):
        smoke_test_adapter(adapter, tiny_model_dir)


def test_what_a_model_directory_keeps():
    for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors", "tokenizer.json",
                 "generation_config.json", "chat_template.jinja", "README.md", "adapter_config.json"):
        assert is_model_file(name), name
    for name in ("zeros.bin", "pytorch_model.bin", "notes.txt", ".hidden.safetensors", "optimizer.pt"):
        assert not is_model_file(name), name
