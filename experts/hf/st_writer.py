"""Write a safetensors file one tensor at a time, so a merge never holds the whole output model.

The header (names, dtypes, shapes, offsets) is known before any data, since a merge's output
layout follows its inputs; tensors are then appended in header order. The format is the
published one: 8-byte little-endian header length, JSON header padded with spaces to 8 bytes,
then the raw little-endian data.

File writes run on a background thread behind a bounded queue (``queue_depth`` tensors), so the
next tensor is merged while the previous one is written (writes are disk-throttled: ~0.4 GB/s
here, as slow as the merge itself); the caller must not modify a tensor after handing it over.
An error in the writer thread is raised by the next `write` or by `close`.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import torch

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


class StreamingSafetensorsWriter:
    def __init__(self, path: Path, layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None, *, queue_depth: int = 2) -> None:
        self.path = path
        self._layout = list(layout)
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in self._layout:
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = path.open("wb")
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._queue: queue.Queue[torch.Tensor | None] = queue.Queue(maxsize=max(queue_depth, 1))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="st-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._f.write(memoryview(data.reshape(-1).view(torch.uint8).numpy()))  # no bytes copy
                except BaseException as e:  # reported to the caller by write/close
                    self._error = e

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype = self._layout[self._next]
        if name != exp_name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the planned "
                             f"{exp_name} {tuple(shape)} {dtype}")
        self._raise()
        data = tensor.detach().contiguous().cpu()
        if data.numel():
            self._queue.put(data)
        self._next += 1

    def close(self) -> None:
        self._stop()
        if self._next != len(self._layout):
            self._f.close()
            raise ValueError(f"only {self._next} of {len(self._layout)} tensors were written")
        try:
            self._raise()
            self._f.flush()
            os.fsync(self._f.fileno())
        finally:
            self._f.close()

    def __enter__(self) -> StreamingSafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()
            self._f.close()
