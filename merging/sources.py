"""Where merge inputs come from: the :class:`TensorSource` seam and two implementations.

A source lists tensor names and hands out one tensor at a time, so a merge holds only the
tensors of the position being merged. ``experts.hf.loading`` satisfies the Protocol
structurally; this module never imports it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import safe_open
from torch import Tensor

from merging.errors import IncompatibleExpertsError
from merging.lora import lora_scaling

__all__ = ["DictSource", "SafetensorsSource", "TensorSource", "tensor_meta"]

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@runtime_checkable
class TensorSource(Protocol):
    """Named tensors, read one at a time.

    Implementations may also offer ``shape(name)``/``dtype(name)`` (read without loading the
    tensor; see :func:`tensor_meta`) and a ``lora_scaling`` attribute for LoRA adapters.
    """

    def keys(self) -> Iterable[str]:
        """All tensor names, in a stable order."""
        ...

    def get(self, name: str) -> Tensor:
        """Load one tensor."""
        ...


def tensor_meta(source: TensorSource, name: str) -> tuple[tuple[int, ...], torch.dtype]:
    """(shape, dtype) of one tensor, from ``shape``/``dtype`` methods when the source has them."""
    shape_fn, dtype_fn = getattr(source, "shape", None), getattr(source, "dtype", None)
    if callable(shape_fn) and callable(dtype_fn):
        return tuple(shape_fn(name)), dtype_fn(name)
    t = source.get(name)
    return tuple(t.shape), t.dtype


class DictSource:
    """A source over tensors already in memory (e.g. ``model.state_dict()``)."""

    def __init__(self, tensors: Mapping[str, Tensor], *, lora_scaling: float | None = None) -> None:
        self._tensors = tensors
        self.lora_scaling = lora_scaling

    def keys(self) -> list[str]:
        """Tensor names in mapping order."""
        return list(self._tensors.keys())

    def get(self, name: str) -> Tensor:
        """The tensor itself (no copy)."""
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor."""
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of one tensor."""
        return self._tensors[name].dtype


class SafetensorsSource:
    """Lazy reader over a model/adapter directory's ``*.safetensors`` files (or one file).

    Only headers are read at construction; :meth:`get` opens the owning file with
    ``safetensors.safe_open`` and loads that one tensor. If the directory holds an
    ``adapter_config.json``, ``lora_scaling`` is its lora_alpha / r (else ``None``).
    """

    def __init__(self, path: str | Path, *, device: str = "cpu") -> None:
        path = Path(path)
        files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            raise IncompatibleExpertsError(f"no *.safetensors files in {path}")
        self.path, self.device = path, device
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    if k in self._where:
                        raise IncompatibleExpertsError(
                            f"tensor {k!r} appears in both {self._where[k]} and {f}"
                        )
                    sl = h.get_slice(k)
                    self._where[k] = f
                    self._meta[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype(), torch.float32))
        cfg = path / "adapter_config.json" if path.is_dir() else None
        self.lora_scaling = lora_scaling(json.loads(cfg.read_text())) if cfg and cfg.is_file() else None

    def keys(self) -> list[str]:
        """Tensor names, file by file."""
        return list(self._where)

    def get(self, name: str) -> Tensor:
        """Load one tensor onto ``device``."""
        with safe_open(str(self._where[name]), framework="pt", device=self.device) as h:
            tensor: Tensor = h.get_tensor(name)
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the header."""
        return self._meta[name][0]

    def dtype(self, name: str) -> torch.dtype:
        """Dtype from the header."""
        return self._meta[name][1]
