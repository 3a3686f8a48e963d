"""The smoke test a model passes before its registration commits: load it as serving will, run one
token through it, and require finite logits.

Validation (`validation.py`, `lora.py`) proves the files are well formed; only a forward pass proves
the numbers are usable: weights full of NaN or infinities pass every structural check and then fail
every request. One token on the CPU costs little next to the load itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from experts.errors import InvalidExpertError
from experts.hf.loading import LoadedModel, load_hf_model
from experts.hf.lora import load_lora_model


def smoke_forward(loaded: LoadedModel) -> None:
    """Run one token through the model; raise InvalidExpertError unless every logit is finite."""
    tok = loaded.tokenizer
    token = next((t for t in (getattr(tok, "bos_token_id", None), getattr(tok, "eos_token_id", None))
                  if isinstance(t, int)), 0)
    try:
        with torch.inference_mode():
            logits = loaded.model(input_ids=torch.tensor([[token]])).logits
    except Exception as e:
        raise InvalidExpertError(f"the model fails a one-token forward pass: {e}") from None
    if not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise InvalidExpertError(f"the model's logits for one token are not finite ({bad} of {logits.numel()} are "
                                 "NaN or infinite): its weights are broken, so it could not generate")


def _load(fn: Callable[..., LoadedModel], *args: Any, **kwargs: Any) -> LoadedModel:
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise InvalidExpertError(f"the model could not be loaded: {e}") from None


def smoke_test_model(model_dir: Path, *, dtype: str | None = None) -> None:
    """Load a validated model directory as serving will and run the one-token smoke forward."""
    smoke_forward(_load(load_hf_model, model_dir, dtype=dtype))


def smoke_test_adapter(adapter_dir: Path, base_dir: Path, *, dtype: str | None = None) -> None:
    """Load a validated LoRA adapter on its base as serving will and run the one-token smoke forward."""
    smoke_forward(_load(load_lora_model, adapter_dir, base_dir, dtype=dtype))
