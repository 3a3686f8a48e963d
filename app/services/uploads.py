"""Receiving model uploads: a multipart body streamed straight into the data dir's staging area.

Nothing of an upload touches the system temp dir: file parts are written as they arrive, `files`
under their bare names into the staging directory that becomes the expert, an `archive` into a spool
file beside it (extracted and deleted afterwards). Files a model directory does not need are never
written (they are reported as dropped). The body is bounded by the upload limit, the number of
uploads in progress by `UploadSlots` (429 beyond it), and the text fields by a small size each.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.errors import ApiError
from experts.errors import InvalidExpertError
from experts.hf.threads import run_sync
from experts.repository.archives import check_upload_filename

TEXT_FIELDS = ("id", "tags", "domain", "base")
MAX_FIELD_BYTES = 64 << 10
MAX_PARTS = 1000
FLUSH_BYTES = 1 << 20


class UploadSlots:
    """At most `limit` uploads in progress (receiving, validating or registering); beyond it, 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._lock = threading.Lock()

    @property
    def in_use(self) -> int:
        return self._used

    def acquire(self) -> Callable[[], None]:
        """Take a slot; returns its release (idempotent)."""
        with self._lock:
            if self._used >= self.limit:
                raise ApiError(429, f"{self._used} uploads are already in progress (the limit is {self.limit}); "
                               "retry when one has finished", code="too_many_uploads", headers={"retry-after": "5"})
            self._used += 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._used -= 1

        return release


@dataclass
class ReceivedUpload:
    """The form of an upload: text fields, the spooled archive (if any), the files written, and the
    names dropped (not needed by a model directory, never written)."""

    fields: dict[str, str] = field(default_factory=dict)
    archive: Path | None = None
    files: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


@dataclass
class _Part:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    name: str = ""
    filename: str | None = None
    text: bytearray | None = None  # a text field
    target: Path | None = None  # a file part being written
    out: IO[bytes] | None = None
    pending: bytearray = field(default_factory=bytearray)


class _Events:
    """python-multipart's callbacks, queued: the I/O happens between `write`s, off the event loop."""

    def __init__(self) -> None:
        self.queue: list[tuple[str, bytes, list[tuple[bytes, bytes]]]] = []
        self._field = b""
        self._value = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def callbacks(self) -> dict[str, Callable[..., None]]:
        def header_field(data: bytes, start: int, end: int) -> None:
            self._field += data[start:end]

        def header_value(data: bytes, start: int, end: int) -> None:
            self._value += data[start:end]

        def header_end() -> None:
            self.headers.append((self._field.lower(), self._value))
            self._field, self._value = b"", b""

        return {
            "on_part_begin": lambda: self.headers.clear(),
            "on_header_field": header_field, "on_header_value": header_value, "on_header_end": header_end,
            "on_headers_finished": lambda: self.queue.append(("begin", b"", list(self.headers))),
            "on_part_data": lambda data, start, end: self.queue.append(("data", bytes(data[start:end]), [])),
            "on_part_end": lambda: self.queue.append(("end", b"", [])),
        }


class UploadReceiver:
    """Streams one multipart upload into `model_dir` (files) and `spool` (an archive)."""

    def __init__(self, model_dir: Path, spool: Path, *, max_bytes: int, keep: Callable[[str], bool],
                 on_field: Callable[[str, str], None] | None = None) -> None:
        self.model_dir, self.spool, self.max_bytes, self.keep = model_dir, spool, max_bytes, keep
        self.on_field = on_field
        self.result = ReceivedUpload()
        self._parts = 0
        self._part: _Part | None = None

    async def receive(self, request: Request) -> ReceivedUpload:
        ctype, params = parse_options_header(request.headers.get("content-type", ""))
        boundary = params.get(b"boundary")
        if ctype != b"multipart/form-data" or not boundary:
            raise ApiError(400, "send the upload as multipart/form-data (an 'archive' or 'files', and an 'id')")
        events = _Events()
        parser = MultipartParser(boundary, events.callbacks())
        received = 0
        try:
            try:
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > self.max_bytes:
                        raise ApiError(413, f"request body exceeds the limit of {self.max_bytes} bytes",
                                       code="payload_too_large")
                    parser.write(chunk)
                    await self._handle(events)
                parser.finalize()
                await self._handle(events)
            except MultipartParseError as e:
                raise ApiError(400, f"the multipart body is malformed: {e}") from None
            except ClientDisconnect:
                raise ApiError(400, "the client disconnected before the upload was complete") from None
            if self._part is not None:
                raise ApiError(400, "the multipart body ended in the middle of a part")
        finally:
            await run_sync(self._close)
        return self.result

    async def _handle(self, events: _Events) -> None:
        queue, events.queue = events.queue, []
        for kind, data, headers in queue:
            if kind == "begin":
                self._begin(headers)
            elif kind == "data":
                await self._data(data)
            else:
                await self._end()

    def _begin(self, headers: list[tuple[bytes, bytes]]) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise ApiError(400, f"too many parts in the upload (the limit is {MAX_PARTS})")
        disposition = next((v for k, v in headers if k == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        part = _Part(list(headers), _decode(options.get(b"name", b"")))
        self._part = part
        if b"filename" not in options:
            part.text = bytearray()
            return
        part.filename = _decode(options[b"filename"])
        if part.name == "archive":
            if self.result.archive is not None or self.result.files:
                raise InvalidExpertError("send either one archive or files, not both")
            part.target = self.result.archive = self.spool
        elif part.name == "files":
            if self.result.archive is not None:
                raise InvalidExpertError("send either one archive or files, not both")
            name = check_upload_filename(part.filename)
            if not self.keep(name):
                self.result.dropped.append(name)
            elif name in self.result.files:
                raise InvalidExpertError(f"the file {name!r} was sent twice")
            else:
                part.target = self.model_dir / name
                self.result.files.append(name)

    async def _data(self, data: bytes) -> None:
        part = self._part
        if part is None:
            return
        if part.text is not None:
            if len(part.text) + len(data) > MAX_FIELD_BYTES:
                raise ApiError(400, f"form field {part.name[:40]!r} is longer than {MAX_FIELD_BYTES} bytes")
            part.text += data
        elif part.target is not None:
            part.pending += data
            if len(part.pending) >= FLUSH_BYTES:
                await run_sync(self._flush, part)

    async def _end(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        if part.text is not None:
            if part.name in TEXT_FIELDS:
                value = _decode(bytes(part.text))
                self.result.fields[part.name] = value
                if self.on_field is not None:
                    self.on_field(part.name, value)  # e.g. refuse a taken id before the files arrive
        elif part.target is not None:
            await run_sync(self._flush, part)
            await run_sync(self._close_part, part)

    def _flush(self, part: _Part) -> None:
        if part.out is None:
            assert part.target is not None
            part.out = part.target.open("xb")
        part.out.write(part.pending)
        part.pending.clear()

    def _close_part(self, part: _Part) -> None:
        if part.out is not None:
            part.out.close()
            part.out = None

    def _close(self) -> None:
        if self._part is not None:
            self._close_part(self._part)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "form names and values must be UTF-8") from None
