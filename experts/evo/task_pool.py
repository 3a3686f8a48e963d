"""The structured LoRA pool of the Evo-Merging reproduction: a byte-level base that knows generic string
skills, and N >= 20 adapters trained to convergence on structured tasks (:mod:`experts.data.synthetic`).

The base (``<prefix>-base``) is a GPT-2 trained from scratch on a mixture of the *base skills* (copy, length,
first/last character, the input twice, case changes, ... on letter and digit strings): it learns the
``tag:input=`` format and how to move characters around, but no pool skill. Each adapter is a rank-8 LoRA
trained on one structured task. The members (:data:`MEMBERS`) have a role towards the targets
(:data:`TARGETS`), after the paper's source-model categories (spec section 8.1):

* ``member``: trained on one sub-task of a multi-task target (the paper's ID setting);
* ``auxiliary``: the target's skill on another domain (an OOD target's "target-domain" adapters);
* ``synergistic``: another skill on the target's domain;
* ``irrelevant``: other skills and domains (arithmetic on numbers, a lookup table, ...);
* ``distractor``: a target-related task with shuffled labels (``~shuf``): the format, no knowledge.

No adapter trains on an OOD target's task, and no adapter ever sees a validation or test input (splits are
disjoint by input). A target's examples are its tasks' examples interleaved (k tasks: n / k of each).
Building is resumable: the base and adapters already registered are kept. Each adapter's lineage holds
its validation-loss history and its final exact match on 300 validation examples (convergence evidence).
"""

from __future__ import annotations

import random
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Final

from experts.data.scoring import encode_examples, exact_match, make_batches
from experts.data.synthetic import SHUFFLED, synthetic_examples
from experts.errors import InvalidExpertError
from experts.hf.tokenizer import train_bpe_tokenizer
from experts.runtime import open_repository
from experts.training.config import TrainConfig
from experts.training.examples import train_on_examples
from experts.training.lm_io import new_gpt2, save_model_atomic
from experts.training.lora import LoraData, LoraSpec, train_lora

__all__ = ["BASE_TASKS", "FULL", "MEMBERS", "QUICK", "TARGETS", "Member", "TaskPoolConfig", "adapter_id",
           "build_task_pool", "check_members", "target_examples"]

BASE_TASKS: Final = tuple(f"{k}/{d}" for k in ("copy", "len", "first", "last", "twice", "rotl", "ends")
                          for d in ("lower", "upper", "digits")) + ("upcase/lower", "downcase/upper")


@dataclass(frozen=True)
class Member:
    """One adapter of the pool: its task and its role towards the targets."""

    task: str
    role: str  # member | auxiliary | synergistic | irrelevant | distractor
    related: tuple[str, ...] = ()  # the targets it relates to


# target name -> its tasks (one task: an OOD target; several: a multi-task target)
TARGETS: Final[dict[str, tuple[str, ...]]] = {
    "mix3": ("rev/lower", "sort/digits", "shift/upper"),
    "rev/digits": ("rev/digits",),
    "sort/upper": ("sort/upper",),
}
MEMBERS: Final[tuple[Member, ...]] = (
    Member("rev/lower", "member", ("mix3", "rev/digits")),
    Member("sort/digits", "member", ("mix3", "sort/upper")),
    Member("shift/upper", "member", ("mix3",)),
    Member("rev/upper", "auxiliary", ("rev/digits",)),
    Member("sort/lower", "auxiliary", ("sort/upper",)),
    Member("dup/digits", "synergistic", ("rev/digits",)),
    Member("swap/digits", "synergistic", ("rev/digits",)),
    Member("dup/upper", "synergistic", ("sort/upper",)),
    Member("swap/upper", "synergistic", ("sort/upper",)),
    Member("shift/lower", "irrelevant"),
    Member("shift/digits", "irrelevant"),
    Member("dup/lower", "irrelevant"),
    Member("swap/lower", "irrelevant"),
    Member("evens/lower", "irrelevant"),
    Member("evens/upper", "irrelevant"),
    Member("dsum/number", "irrelevant"),
    Member("bin/number", "irrelevant"),
    Member("inc/number", "irrelevant"),
    Member("capital/country", "irrelevant"),
    Member("rev/lower" + SHUFFLED, "distractor", ("mix3", "rev/digits")),
    Member("sort/digits" + SHUFFLED, "distractor", ("mix3", "sort/upper")),
    Member("shift/upper" + SHUFFLED, "distractor", ("mix3",)),
    Member("rev/upper" + SHUFFLED, "distractor", ("rev/digits",)),
    Member("sort/lower" + SHUFFLED, "distractor", ("sort/upper",)),
)


@dataclass(frozen=True)
class TaskPoolConfig:
    """Model size and budgets. Budgets are token budgets (reproducible); `val_examples` per adapter."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    base_examples_per_task: int
    base_budget: TrainConfig
    adapter_budget: TrainConfig  # TrainConfig.lora: the LoRA preset
    lora: LoraSpec
    val_examples: int = 300


_TARGETS_LORA = ("c_attn", "c_proj", "c_fc")
FULL = TaskPoolConfig(2, 64, 4, 48, 4000,  # sized for a shared 2-core CPU (docs/evo_merging.md)
                      TrainConfig(max_tokens=4000 * 64 * 17, batch_size=64, seq_len=48, lr=3e-3, warmup_steps=100,
                                  schedule="cosine", eval_every=1000),
                      TrainConfig.lora(max_tokens=700 * 64 * 17, batch_size=64, seq_len=48, lr=1e-2,
                                       warmup_steps=50, schedule="cosine", eval_every=250),
                      LoraSpec(r=8, lora_alpha=16, target_modules=_TARGETS_LORA))
QUICK = TaskPoolConfig(2, 32, 2, 48, 200,
                       TrainConfig(max_tokens=60 * 16 * 17, batch_size=16, seq_len=48, lr=3e-3, warmup_steps=5,
                                   eval_every=10**6),
                       TrainConfig.lora(max_tokens=15 * 16 * 17, batch_size=16, seq_len=48, lr=1e-2, warmup_steps=2,
                                        eval_every=10**6),
                       LoraSpec(r=4, lora_alpha=8, target_modules=_TARGETS_LORA), val_examples=24)


def adapter_id(prefix: str, task: str) -> str:
    """``rev/lower~shuf`` -> ``<prefix>-rev-lower-shuf`` (an expert id)."""
    return f"{prefix}-" + task.replace("/", "-").replace(SHUFFLED, "-shuf")


def target_examples(target: str, split: str, n: int) -> list[dict[str, str]]:
    """`n` examples of `target` (a key of :data:`TARGETS` or a structured task), its tasks interleaved."""
    tasks = TARGETS.get(target, (target,))
    k = len(tasks)
    per = [synthetic_examples(t, split, n // k + (i < n % k)) for i, t in enumerate(tasks)]
    return [per[i][j] for j in range(max(len(p) for p in per)) for i in range(k) if j < len(per[i])]


def _tokenizer() -> Any:
    """The byte-level tokenizer (256 bytes + EOS, no merges): one token per character."""
    return train_bpe_tokenizer(["tag:input="], vocab_size=257, min_frequency=1)


def _train_base(repo: Any, base_id: str, cfg: TaskPoolConfig, say: Callable[[str], None]) -> dict[str, Any]:
    """Train the base on the base skills' mixture and register it (kind local); returns its report."""
    tok = _tokenizer()
    model = new_gpt2(len(tok), n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                     n_positions=cfg.n_positions, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                     seed=cfg.base_budget.seed)
    train = [e for t in BASE_TASKS for e in synthetic_examples(t, "train", cfg.base_examples_per_task)]
    random.Random("base-mixture").shuffle(train)
    val = [e for t in BASE_TASKS for e in synthetic_examples(t, "validation", 20)]
    enc = encode_examples(tok, train, max_tokens=cfg.n_positions)
    val_enc = encode_examples(tok, val, max_tokens=cfg.n_positions)
    t0 = time.perf_counter()
    result = train_on_examples(model, enc, val_enc, cfg.base_budget, pad_id=tok.eos_token_id)
    model.eval()
    per_task = {t: _exact(model, tok, synthetic_examples(t, "validation", 100), cfg) for t in BASE_TASKS}
    report = {"steps": result.steps, "tokens": result.tokens, "seconds": round(time.perf_counter() - t0, 1),
              "final_train_loss": result.final_train_loss, "val_history": result.val_history,
              "val_exact": per_task}
    staging = repo.store.new_staging()
    save_model_atomic(model, tok, staging)
    lineage = {"op": "task_pool.base", "parents": [], "recipe": {"tasks": list(BASE_TASKS),
               "size": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "n_positions")},
               "budget": asdict(cfg.base_budget)}, "train": report}
    repo.register_staged(base_id, staging, tags=["task-pool", "base"], lineage=lineage)
    say(f"base {base_id}: {result.steps} steps, {report['seconds']:.0f} s, exact match on its skills "
        f"min {min(per_task.values()):.3f}")
    return report


def _exact(model: Any, tok: Any, examples: list[dict[str, str]], cfg: TaskPoolConfig) -> float:
    batches = make_batches(encode_examples(tok, examples, max_tokens=cfg.n_positions), pad_id=tok.eos_token_id)
    return exact_match(model, batches)[0]


def build_task_pool(target: Path | Any, *, quick: bool = False, config: TaskPoolConfig | None = None,
                    prefix: str = "tpool", members: tuple[Member, ...] = MEMBERS,
                    echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or complete) the structured pool; returns {"base", "adapters", "members", "trained", "seconds"}.

    Args:
        target: a data directory (its registry at <dir>/registry.db) or an open ExpertRepository.
        quick: a tiny base and a few steps per adapter (CI; nothing converges).
        members: the adapters to train, in pool order.
    """
    from transformers.utils import logging as hf_logging  # heavy: imported when a pool is built

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    cfg = config or (QUICK if quick else FULL)
    check_members(members)
    say = echo or (lambda s: print(s, flush=True))
    own = not hasattr(target, "registry")
    repo = target
    if own:
        data_dir = Path(target)
        data_dir.mkdir(parents=True, exist_ok=True)
        repo = open_repository(data_dir, database_url=f"sqlite:///{(data_dir / 'registry.db').resolve()}",
                               max_loaded_models=4, max_loaded_bytes=1 << 30)
    t0 = time.perf_counter()
    try:
        base_id = f"{prefix}-base"
        if not repo.registry.has_expert(base_id):
            say(f"training the base {base_id} on {len(BASE_TASKS)} base skills")
            _train_base(repo, base_id, cfg, say)
        ids, trained = [], 0
        for i, m in enumerate(members):
            eid = adapter_id(prefix, m.task)
            ids.append(eid)
            if repo.registry.has_expert(eid):
                continue
            t = time.perf_counter()
            data = LoraData(task=m.task, max_val_examples=cfg.val_examples)
            budget = replace(cfg.adapter_budget, seed=_seed(m.task))
            rec = train_lora(repo, eid, base_id, data, lora=cfg.lora, budget=budget,
                             tags=["task-pool", prefix, f"role:{m.role}", f"task:{m.task}"], domain=m.task)
            trained += 1
            tr = rec.lineage["train"]
            say(f"[{i + 1}/{len(members)}] {eid} ({m.role}): val loss {tr['initial_val_loss']:.3f} -> "
                f"{tr['final_val_loss']:.3f}, exact match {tr.get('final_val_exact', float('nan')):.3f} "
                f"({tr['steps']} steps, {time.perf_counter() - t:.0f} s)")
        return {"base": base_id, "adapters": ids, "members": [asdict(m) for m in members], "trained": trained,
                "seconds": round(time.perf_counter() - t0, 1)}
    finally:
        if own:
            repo.close()


def _seed(task: str) -> int:
    """An adapter's training seed, from its task alone: a pool built in parts gives the same adapters."""
    return zlib.crc32(task.encode())


def check_members(members: tuple[Member, ...]) -> None:
    """InvalidExpertError if an adapter trains on an OOD target's task (the targets must stay unseen)."""
    ood = {t for tasks in TARGETS.values() if len(tasks) == 1 for t in tasks}
    bad = [m.task for m in members if m.task in ood]
    if bad:
        raise InvalidExpertError(f"pool members train on OOD target tasks: {bad}")

