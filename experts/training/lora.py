"""Training LoRA adapters on a registered local base, and registering them as `lora` experts.

Data is one of: a corpus (a domain name; optionally only part k of K contiguous parts of its train
split), a task of :mod:`experts.data.datasets` (prompt/completion pairs from a corpus), or inline
examples. Token streams train with :func:`experts.training.lm.train_causal_lm` (random windows); pairs
train with :func:`experts.training.examples.train_on_examples` (random batches of examples, right
padding, loss on completion tokens only), with the same optimiser, schedule, clipping, budgets,
progress and cancellation semantics. The budget is a :class:`~experts.training.config.TrainConfig`,
by default the LoRA preset :meth:`TrainConfig.lora` (no weight decay). Only the LoRA factors train
(peft ``get_peft_model`` on a private copy of the base; dropout 0). The adapter is saved with
``save_pretrained`` into a staging dir and registered with lineage
``{"op": "lora.train", "parents": [{"id": base}], "recipe": {...}}``. A cancelled or failed run
registers nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from experts.data.datasets import TASKS, load_task
from experts.data.scoring import Encoded, encode_examples, exact_match, make_batches, mean_loss, validate_examples
from experts.data.synthetic import is_synthetic
from experts.errors import ExpertExistsError, InvalidExpertError, JobCancelledError
from experts.repository.registry import ExpertRecord
from experts.repository.store import check_expert_id
from experts.training.config import TrainConfig, TrainProgress, TrainResult
from experts.training.examples import train_on_examples
from experts.training.lm import evaluate_loss, train_causal_lm

Progress = Callable[[float, str], None]
ShouldStop = Callable[[], bool]

__all__ = ["LoraData", "LoraSpec", "train_lora"]


@dataclass(frozen=True)
class LoraSpec:
    """The adapter's shape: rank, lora_alpha (scaling lora_alpha / r), target modules (None: peft's
    default for the architecture)."""

    r: int = 8
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] | None = None

    def config(self) -> Any:
        """The peft LoraConfig (dropout 0, causal LM); InvalidExpertError for a rank below 1."""
        from peft import LoraConfig  # heavy: imported on first use (see _load_base)

        if self.r < 1:
            raise InvalidExpertError("LoRA rank r must be >= 1")
        targets = list(self.target_modules) if self.target_modules else None
        return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=targets, lora_dropout=0.0,
                          task_type="CAUSAL_LM")


@dataclass(frozen=True)
class LoraData:
    """What to train on: exactly one of `corpus`, `task`, `examples`."""

    corpus: str | None = None
    part: tuple[int, int] | None = None  # (k, K): the k-th of K contiguous parts of the train stream
    task: str | None = None
    examples: tuple[Mapping[str, Any], ...] | None = None
    validation: tuple[Mapping[str, Any], ...] | None = None  # inline: validation examples (optional)
    max_val_examples: int = 64

    def check(self) -> None:
        """InvalidExpertError unless exactly one source is given and it is well-formed."""
        given = [x is not None for x in (self.corpus, self.task, self.examples)]
        if sum(given) != 1:
            raise InvalidExpertError("give exactly one of corpus, task or examples")
        if self.part is not None:
            if self.corpus is None:
                raise InvalidExpertError("part applies to a corpus only")
            k, n = self.part
            if not (n >= 1 and 0 <= k < n):
                raise InvalidExpertError(f"part must be [k, K] with 0 <= k < K, got {list(self.part)}")
        if self.task is not None and self.task not in TASKS and not is_synthetic(self.task):
            raise InvalidExpertError(f"unknown task {self.task!r}; tasks: {', '.join(TASKS)} or a structured "
                                     "task <skill>/<domain> (experts.data.synthetic)")
        if self.examples is not None:
            validate_examples(self.examples)
        if self.validation is not None:
            validate_examples(self.validation)

    def describe(self) -> dict[str, Any]:
        """The data as recorded in the lineage and the job's parameters (inline examples as counts)."""
        if self.corpus is not None:
            return {"corpus": self.corpus, "part": list(self.part) if self.part else None}
        if self.task is not None:
            return {"task": self.task}
        return {"examples": len(self.examples or ()), "validation": len(self.validation or ())}


# ------------------------------------------------------------------------------------------------
# the whole operation


@dataclass
class _Prepared:
    """The training data ready for a loop: a token stream, or encoded prompt/completion pairs."""

    kind: str  # "stream" | "pairs"
    train_ids: torch.Tensor | None = None
    val_ids: torch.Tensor | None = None
    train_ex: list[Encoded] = field(default_factory=list)
    val_ex: list[Encoded] = field(default_factory=list)


def _prepare(btm: Any, tokenizer: Any, data: LoraData, budget: TrainConfig, n_positions: int) -> _Prepared:
    """Tokenize the data: a corpus (part) as a stream, a task or inline examples as encoded pairs."""
    max_tok = min(budget.seq_len, n_positions)
    if data.corpus is not None:
        if btm is None:
            raise InvalidExpertError("corpus data needs the gateway's corpora (no BTM given)")
        train = btm.token_ids(tokenizer, data.corpus, "train")
        if data.part is not None:
            k, n = data.part
            size = train.numel() // n
            train = train[k * size : (k + 1) * size]
        if train.numel() < budget.seq_len + 1:
            raise InvalidExpertError(f"corpus {data.corpus!r} (part {data.part}) has only {train.numel()} "
                                     "tokens")
        val = btm.token_ids(tokenizer, data.corpus, "validation")
        return _Prepared("stream", train_ids=train, val_ids=val)
    if data.task is not None:
        if btm is None and not is_synthetic(data.task):
            raise InvalidExpertError("task data needs the gateway's corpora (no BTM given)")
        train = load_task(btm, data.task, "train")
        val = load_task(btm, data.task, "validation", data.max_val_examples)
        return _Prepared("pairs", train_ex=encode_examples(tokenizer, train, max_tokens=max_tok),
                         val_ex=encode_examples(tokenizer, val, max_tokens=max_tok))
    train_ex = encode_examples(tokenizer, list(data.examples or ()), max_tokens=max_tok)
    val_ex = encode_examples(tokenizer, list(data.validation), max_tokens=max_tok) if data.validation else []
    return _Prepared("pairs", train_ex=train_ex, val_ex=val_ex)


def train_lora(
    repo: Any,
    expert_id: str,
    base: str,
    data: LoraData,
    *,
    lora: LoraSpec = LoraSpec(),
    budget: TrainConfig = TrainConfig.lora(max_tokens=8 * 128 * 50),
    btm: Any = None,
    tags: Sequence[str] = (),
    domain: str | None = None,
    progress: Progress | None = None,
    should_stop: ShouldStop | None = None,
) -> ExpertRecord:
    """Train a LoRA adapter on `base` and register it as `expert_id` (kind `lora`).

    Args:
        repo: the ExpertRepository; `base` must be a registered local expert.
        data: corpus, task or inline examples (see :class:`LoraData`).
        budget: the training config; :meth:`TrainConfig.lora` is the LoRA preset (higher learning rate,
            shorter warm-up, no weight decay). For pairs, `seq_len` is the maximum tokens per example.
        btm: an :class:`experts.btm.operations.BTM` for corpus and task data (corpora root, tokenized
            streams).
        progress: ``progress(fraction, message)``; should_stop: cancellation (raises JobCancelledError,
            nothing registered).

    Returns:
        The registered record; its lineage holds the recipe and the training numbers, including the
        validation loss of the base before training (`initial_val_loss`) and after (`final_val_loss`),
        the periodic validation losses (`val_history`, [step, loss]) and, for prompt/completion pairs,
        the exact match and token accuracy on the validation pairs after training (`final_val_exact`,
        `final_val_token_acc`).
    """
    _check_request(repo, expert_id, data)
    model, tok, n_pos = _load_base(repo, base, budget)
    prep = _prepare(btm, tok, data, budget, n_pos)
    peft_model = _attach_lora(model, lora, base)
    report = _reporter(expert_id, progress)
    result, initial, final = _train_prepared(peft_model, tok, prep, budget, report, should_stop)
    if result.cancelled:
        raise JobCancelledError(f"training of {expert_id} was cancelled; nothing was registered")
    if progress:
        progress(0.98, "saving the adapter")
    train = {"tokens": result.tokens, "steps": result.steps, "seconds": round(result.elapsed_s, 2),
             "final_train_loss": _finite(result.final_train_loss), "initial_val_loss": initial,
             "final_val_loss": final, "val_history": [[s, _finite(v)] for s, v in result.val_history]}
    if prep.kind == "pairs" and prep.val_ex:  # convergence evidence: exact match on the validation pairs
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        exact, token_acc = exact_match(peft_model, make_batches(prep.val_ex, pad_id=pad))
        train.update(final_val_exact=exact, final_val_token_acc=token_acc, val_examples=len(prep.val_ex))
    return _save_and_register(repo, peft_model, expert_id, base, data, lora, budget, train, list(tags),
                              domain)


def _check_request(repo: Any, expert_id: str, data: LoraData) -> None:
    """Refuse a bad or taken id and inconsistent data before loading anything."""
    check_expert_id(expert_id)
    if repo.registry.has_expert(expert_id):
        raise ExpertExistsError(expert_id)
    data.check()


def _load_base(repo: Any, base: str, budget: TrainConfig) -> tuple[Any, Any, int]:
    """A private fp32 copy of the local expert `base`, its tokenizer and its context length."""
    # transformers is heavy: imported on first use, so importing this module (the API's start) stays fast
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_rec = repo.record(base)
    if base_rec.kind != "local":
        raise InvalidExpertError(f"the base of a LoRA adapter must be a local expert; {base!r} is "
                                 f"{base_rec.kind}")
    base_dir = repo.artifact_dir(base_rec)
    model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(base_dir, local_files_only=True)
    cfg = model.config
    n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None) or 1 << 30
    if budget.seq_len > n_pos:
        raise InvalidExpertError(f"seq_len {budget.seq_len} exceeds the base's {n_pos} positions")
    return model, tok, n_pos


def _attach_lora(model: Any, lora: LoraSpec, base: str) -> Any:
    """The base wrapped by peft with fresh LoRA factors (only they train)."""
    # peft and transformers are heavy: imported on first use (see _load_base)
    from peft import get_peft_model
    from transformers.pytorch_utils import Conv1D

    lcfg = lora.config()
    lcfg.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2 stores (in, out)
    try:
        return get_peft_model(model, lcfg)
    except ValueError as e:  # e.g. target modules not found in the base
        raise InvalidExpertError(f"cannot attach LoRA to {base!r}: {e}") from None


def _reporter(expert_id: str, progress: Progress | None) -> Callable[[TrainProgress], None]:
    """The training loop's progress, as job progress (the last 3% are saving and registering)."""
    def report(p: TrainProgress) -> None:
        if progress:
            val = f", val loss {p.val_loss:.3f}" if p.val_loss is not None else ""
            progress(0.97 * p.fraction, f"{expert_id}: step {p.step}, loss {p.train_loss:.3f}{val}")

    return report


def _train_prepared(peft_model: Any, tok: Any, prep: _Prepared, budget: TrainConfig,
                    report: Callable[[TrainProgress], None],
                    should_stop: ShouldStop | None) -> tuple[TrainResult, float | None, float | None]:
    """Train on a stream or on pairs; (result, validation loss before, validation loss after)."""
    if prep.kind == "stream":
        def stream_val() -> float:
            return evaluate_loss(peft_model, prep.val_ids, seq_len=budget.seq_len,
                                 max_tokens=budget.eval_tokens, batch_size=budget.batch_size)

        initial = stream_val() if prep.val_ids is not None and prep.val_ids.numel() >= 2 else None
        result = train_causal_lm(peft_model, prep.train_ids, prep.val_ids, budget, on_progress=report,
                                 should_stop=should_stop)
        final = stream_val() if initial is not None and not result.cancelled else result.final_val_loss
        return result, initial, final
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    val_batches = make_batches(prep.val_ex, pad_id=pad) if prep.val_ex else None
    initial = mean_loss(peft_model, val_batches) if val_batches else None
    result = train_on_examples(peft_model, prep.train_ex, prep.val_ex or None, budget, pad_id=pad,
                               on_progress=report, should_stop=should_stop)
    final = mean_loss(peft_model, val_batches) if val_batches and not result.cancelled else None
    return result, initial, final


def _save_and_register(repo: Any, peft_model: Any, expert_id: str, base: str, data: LoraData, lora: LoraSpec,
                       budget: TrainConfig, train: dict[str, Any], tags: list[str],
                       domain: str | None) -> ExpertRecord:
    """save_pretrained into a staging dir, then register (the staging is discarded on any failure)."""
    staging = repo.store.new_staging()
    try:
        peft_model.save_pretrained(staging)
    except BaseException:
        repo.store.discard(staging)
        raise
    lineage = {
        "op": "lora.train",
        "parents": [{"id": base, "weight": 1.0}],
        "base": base,
        "recipe": {"data": data.describe(), "lora": {"r": lora.r, "lora_alpha": lora.lora_alpha,
                                                     "target_modules": list(lora.target_modules or [])},
                   "budget": asdict(budget)},
        "train": train,
    }
    return repo.register_adapter(expert_id, staging, base=base, tags=tags, domain=domain, lineage=lineage)


def _finite(x: float) -> float | None:
    """`x`, or None for nan and infinities (JSON has neither)."""
    return x if math.isfinite(x) else None
