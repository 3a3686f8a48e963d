"""Validate a Hugging Face causal-LM directory before anything is registered.

Checks, cheapest first: config parses and names a causal-LM architecture transformers can build;
every safetensors file is structurally sound (header parses; every tensor has a known dtype and
offsets that span exactly its shape x dtype size, without overlaps or holes, to the end of the file);
the tensors in the files match the parameters of the model built from the config (names and shapes;
tied weights may be absent); a tokenizer is present and loads. The model is built on the `meta`
device, so validation costs no weight memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from experts.errors import InvalidExpertError

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")
TOKENIZER_AUX_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "adapter_config.json")
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
CARD_FILES = ("README.md", "MODEL_CARD.md")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: Every dtype the safetensors format defines, with its size in bytes; anything else is refused.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    architecture: str
    model_type: str
    num_params: int
    dtype: str
    context_length: int | None
    tokenizer_fingerprint: str
    size_bytes: int


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and check a safetensors header without reading the tensor data: every entry has a known
    dtype, a shape and offsets whose span is exactly shape x dtype size, the tensors neither overlap
    nor leave holes, and they fill the data region to the end of the file."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InvalidExpertError(f"{path.name}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n <= 1 or 8 + n > size or n > 100_000_000:
            raise InvalidExpertError(f"{path.name}: corrupt safetensors header (declared length {n})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidExpertError(f"{path.name}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise InvalidExpertError(f"{path.name}: corrupt safetensors header")
    header.pop("__metadata__", None)
    spans = sorted((_check_entry(path.name, name, entry), name) for name, entry in header.items())
    prev_stop, prev_name = 0, None
    for (start, stop), name in spans:
        if start < prev_stop:
            raise InvalidExpertError(f"{path.name}: the data of tensors {prev_name!r} and {name!r} overlap "
                                     "(corrupt data_offsets)")
        if start > prev_stop:
            raise InvalidExpertError(f"{path.name}: a hole of {start - prev_stop} bytes before tensor {name!r} "
                                     "(corrupt data_offsets)")
        prev_stop, prev_name = stop, name
    data_len = size - 8 - n
    if prev_stop != data_len:
        where = f"tensor {prev_name!r} reaches past the end of the file; " if prev_stop > data_len else ""
        raise InvalidExpertError(f"{path.name}: {where}the file is {size} bytes but its header describes "
                                 f"{8 + n + prev_stop} (truncated or corrupt)")
    return header


def _check_entry(file: str, name: str, entry: object) -> tuple[int, int]:
    """One header entry's (start, stop), after checking its dtype, shape and that the span fits both."""
    try:
        start, stop = entry["data_offsets"]  # type: ignore[index]
        shape, dtype = entry["shape"], entry["dtype"]  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise InvalidExpertError(f"{file}: corrupt entry for tensor {name!r}") from None
    if not all(_is_count(x) for x in (start, stop)) or start > stop:
        raise InvalidExpertError(f"{file}: corrupt data_offsets {[start, stop]} for tensor {name!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise InvalidExpertError(f"{file}: corrupt shape {shape!r} for tensor {name!r}")
    if dtype not in DTYPE_BYTES:
        raise InvalidExpertError(f"{file}: tensor {name!r} has an unknown dtype {dtype!r} (known: "
                                 f"{', '.join(DTYPE_BYTES)})")
    need = math.prod(shape) * DTYPE_BYTES[dtype]
    if stop - start != need:
        raise InvalidExpertError(f"{file}: tensor {name!r} spans {stop - start} bytes, but shape {shape} of {dtype} "
                                 f"needs {need} (corrupt data_offsets)")
    return start, stop


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def tokenizer_fingerprint(model_dir: Path) -> str:
    """sha256 over the files that define the vocabulary (JSON canonicalised, so re-saving is stable)."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        p = model_dir / name
        if not p.is_file():
            continue
        found = True
        data = p.read_bytes()
        if name.endswith(".json"):
            try:
                obj = json.loads(data)
                obj.pop("version", None) if isinstance(obj, dict) else None
                data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise InvalidExpertError(f"{name}: not valid JSON") from None
        h.update(name.encode() + b"\0" + data + b"\0")
    if not found:
        raise InvalidExpertError(
            f"no tokenizer files found (expected one of {', '.join(TOKENIZER_FILES)}); save the tokenizer "
            "with tokenizer.save_pretrained(dir)"
        )
    return h.hexdigest()


def _build_on_meta(model_dir: Path):  # -> (config, model)
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # transformers raises several types for bad configs
        raise InvalidExpertError(f"config.json could not be parsed: {e}") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise InvalidExpertError(f"model_type {config.model_type!r} is not a causal LM transformers can build")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:
        raise InvalidExpertError(f"transformers cannot build a model from this config: {e}") from None
    return config, model


def _check_weights(model_dir: Path, model: torch.nn.Module) -> tuple[str, int]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        bins = list(model_dir.glob("*.bin")) + list(model_dir.glob("*.pt"))
        hint = " (pickled .bin weights are not accepted: convert them to safetensors)" if bins else ""
        raise InvalidExpertError(f"no model.safetensors found{hint}")
    found: dict[str, dict] = {}
    for f in files:
        for name, entry in read_safetensors_header(f).items():
            found[name] = entry
    groups: dict[int, list[str]] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
        shapes[name] = tuple(p.shape)
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in model.state_dict():
            shapes[name] = tuple(b.shape)
    unexpected = sorted(set(found) - set(shapes))
    if unexpected:
        raise InvalidExpertError(f"weights do not match the config: unexpected tensors {unexpected[:5]}")
    for name, shape in shapes.items():
        if name in found:
            if tuple(found[name]["shape"]) != shape:
                raise InvalidExpertError(
                    f"weights do not match the config: {name} has shape {tuple(found[name]['shape'])}, "
                    f"the config implies {shape}"
                )
    missing = [ns for ns in groups.values() if not any(n in found for n in ns)]
    if missing:
        raise InvalidExpertError(f"weights do not match the config: missing tensors {[m[0] for m in missing[:5]]}")
    dtypes = [e["dtype"] for e in found.values() if e["dtype"] in SAFETENSORS_DTYPES]
    dtype = SAFETENSORS_DTYPES[max(set(dtypes), key=dtypes.count)] if dtypes else "float32"
    num_params = sum(p.numel() for p in model.parameters())
    return dtype, num_params


def validate_model_dir(model_dir: Path) -> ModelInfo:
    """Validate a causal-LM directory; raise InvalidExpertError saying what is wrong."""
    if not model_dir.is_dir():
        raise InvalidExpertError(f"{model_dir} is not a directory")
    if not (model_dir / "config.json").is_file():
        raise InvalidExpertError("config.json is missing")
    config, model = _build_on_meta(model_dir)
    dtype, num_params = _check_weights(model_dir, model)
    fingerprint = tokenizer_fingerprint(model_dir)
    try:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise InvalidExpertError(f"the tokenizer could not be loaded: {e}") from None
    ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    arch = (config.architectures or [type(model).__name__])[0]
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    return ModelInfo(arch, config.model_type, num_params, dtype, ctx, fingerprint, size)


KEPT_FILES = frozenset(MODEL_FILES + TOKENIZER_FILES + TOKENIZER_AUX_FILES + TEMPLATE_FILES + CARD_FILES)


def is_model_file(name: str) -> bool:
    """Whether a file of a model directory is worth keeping: config, weights (safetensors), tokenizer,
    generation config, chat template, README / model card. Anything else is dropped."""
    return name in KEPT_FILES or (name.endswith(".safetensors") and not name.startswith("."))


def model_files(model_dir: Path) -> list[Path]:
    """The files of a model directory worth keeping (`is_model_file`)."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and is_model_file(p.name))
