"""The streaming safetensors writer produces files safetensors itself reads back exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from experts.hf.st_writer import StreamingSafetensorsWriter


def test_round_trip_all_dtypes_and_shapes(tmp_path):
    ts = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2).to(torch.bfloat16),
          "s": torch.tensor(2.5), "z": torch.zeros(0), "m": torch.tensor([True, False]), "h": torch.randn(7).half()}
    p = tmp_path / "x.safetensors"
    with StreamingSafetensorsWriter(p, [(k, tuple(v.shape), v.dtype) for k, v in ts.items()]) as w:
        for k, v in ts.items():
            w.write(k, v)
    back = load_file(p)
    assert all(torch.equal(back[k], ts[k]) for k in ts)


def test_refuses_out_of_plan_tensors(tmp_path):
    w = StreamingSafetensorsWriter(tmp_path / "x.safetensors", [("a", (2,), torch.float32)])
    with pytest.raises(ValueError, match="does not match"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="only 0 of 1"):
        w.close()
