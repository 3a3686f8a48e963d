"""Branch-Train-Merge over the repository (Li et al. 2022, arXiv:2208.03306).

seed:   train a fresh LM on a uniform mixture of domains (§3.1, "seed LM"); with `keep_state` its
        optimizer state and schedule position are saved with it (spec §1.3), for experts to resume.
branch: a new expert's parameters are a weighted average of existing experts; by default the
        weights are the domain posterior of those experts on >= 100 held-out dev sequences of the
        new domain (spec §1.3, §2.3). First-round experts do not branch: they resume the seed.
train:  continue training an expert on one domain only (§3.1, "Train"); `resume=True` continues
        the source's optimizer state and schedule (a first-round expert resuming the seed).
merge:  add the trained expert to an ELMforest, served as a posterior-weighted ensemble (§2)
        or collapsed by parameter averaging (§4.4).
Every step registers a new expert with its lineage; a failed or cancelled step registers nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from experts.btm.mixture import estimate_prior
from experts.btm.protocol import DEV_SEQUENCES, dev_sequences, load_trainer_state, resume_config, save_trainer_state
from experts.data.corpora import DOMAINS, build_corpus, get_corpus, load_split
from experts.data.tokens import tokenize_text
from experts.errors import InvalidExpertError, JobCancelledError
from experts.hf.tokenizer import train_bpe_tokenizer
from experts.repository.merges import MergeRunner
from experts.repository.registry import ExpertRecord
from experts.repository.repo import ExpertRepository
from experts.training.config import TrainConfig
from experts.training.lm import new_gpt2, save_model_atomic, train_causal_lm
from merging.recipe import MergeRecipe

Progress = Callable[[float, str], None]
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class ModelSize:
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    n_positions: int = 256
    vocab_size: int = 4096


@dataclass
class BTM:
    repo: ExpertRepository
    data_dir: Path
    corpus_bytes: int = 2_000_000
    runner: Any = None  # trains a pipeline's first round as parallel tasks (experts.btm.pipeline.Runner)
    _ids_cache: dict[tuple[str, str, str], torch.Tensor] = field(default_factory=dict)

    @property
    def merges(self) -> MergeRunner:
        return MergeRunner(self.repo)

    @property
    def corpora_root(self) -> Path:
        return self.data_dir / "corpora"

    # -- data ---------------------------------------------------------------------------------
    def ensure_corpus(self, domain: str) -> None:
        ensure_corpus(self.corpora_root, self.corpus_bytes, domain)

    def token_ids(self, tokenizer: Any, domain: str, split: str) -> torch.Tensor:
        key = (_tok_key(tokenizer), domain, split)
        if key not in self._ids_cache:
            self._ids_cache[key] = corpus_ids(self.corpora_root, self.corpus_bytes, tokenizer, domain, split)
        return self._ids_cache[key]

    def mixture_ids(self, tokenizer: Any, domains: list[str], split: str) -> torch.Tensor:
        """A uniform mixture: the same number of tokens from every domain, interleaved in blocks."""
        streams = [self.token_ids(tokenizer, d, split) for d in domains]
        n = min(int(s.numel()) for s in streams)
        block = 4096
        parts = []
        for start in range(0, n, block):
            parts.extend(s[start:min(start + block, n)] for s in streams)
        return torch.cat(parts)

    def tokenizer(self, domains: list[str], vocab_size: int) -> Any:
        """One byte-level BPE per (domains, vocab) trained on the mixture and kept under the data dir,
        shared by every expert of a forest so they can be merged and ensembled."""
        from transformers import AutoTokenizer  # heavy: imported on first use (the app starts without it)

        tag = hashlib.sha256(f"{sorted(domains)}:{vocab_size}:{self.corpus_bytes}".encode()).hexdigest()[:12]
        path = self.data_dir / "tokenizers" / tag
        if not (path / "tokenizer.json").is_file():
            for d in domains:
                self.ensure_corpus(d)
            texts = [load_split(self.corpora_root, d, "train") for d in sorted(domains)]
            tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
            tmp = path.with_name(path.name + ".tmp")
            tok.save_pretrained(tmp)
            tmp.rename(path)
        return AutoTokenizer.from_pretrained(path)

    # -- helpers ------------------------------------------------------------------------------
    def _fresh_model(self, expert_id: str) -> tuple[Any, Any]:
        """A private, trainable copy of an expert loaded from disk (the served copy is untouched)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: on first use

        path = self.repo.artifact_dir(self.repo.record(expert_id))
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True)

    def _train_and_register(self, model: Any, tok: Any, expert_id: str, train_ids: torch.Tensor,
                            val_ids: torch.Tensor | None, budget: TrainConfig, lineage: dict[str, Any],
                            domain: str | None, tags: list[str], progress: Progress | None,
                            should_stop: ShouldStop | None, seed_offset: int = 0,
                            optimizer_state: dict[str, Any] | None = None, keep_state: bool = False
                            ) -> ExpertRecord:
        staging = self.repo.store.new_staging()
        try:
            train_into(staging, model, tok, expert_id, train_ids, val_ids, budget, lineage, progress, should_stop,
                       seed_offset=seed_offset, optimizer_state=optimizer_state, keep_state=keep_state)
        except BaseException:
            self.repo.store.discard(staging)
            raise
        return self.repo.register_staged(expert_id, staging, domain=domain, tags=tags, lineage=lineage)

    # -- the four operations ------------------------------------------------------------------
    def seed(self, expert_id: str, domains: list[str], budget: TrainConfig, size: ModelSize = ModelSize(), *,
             progress: Progress | None = None, should_stop: ShouldStop | None = None,
             lineage: dict[str, Any] | None = None, keep_state: bool = True) -> ExpertRecord:
        """Train a seed LM on a uniform mixture of `domains`; its optimizer state and schedule position are
        kept with it (spec §1.3) unless `keep_state` is False. `lineage` adds to the recorded lineage."""
        if not domains:
            raise InvalidExpertError("seed needs at least one domain")
        tok = self.tokenizer(domains, size.vocab_size)
        model = new_gpt2(len(tok), n_layer=size.n_layer, n_embd=size.n_embd, n_head=size.n_head,
                         n_positions=size.n_positions, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                         seed=budget.seed)
        train = self.mixture_ids(tok, domains, "train")
        val = self.mixture_ids(tok, domains, "validation")
        full = {"op": "btm.seed", "parents": [], "recipe": {"domains": domains, "size": asdict(size)},
                **(lineage or {})}
        return self._train_and_register(model, tok, expert_id, train, val, budget, full, None,
                                        ["btm", "seed"], progress, should_stop, keep_state=keep_state)

    def branch_weights(self, parents: list[str], domain: str, *, sequences: int = DEV_SEQUENCES,
                       seq_len: int = 128, split: str = "validation") -> list[float]:
        """The parents' domain posterior on held-out dev data of the new domain: the cached-prior EMA
        (decay 0.3) over the first `sequences` `seq_len`-token sequences of its `split` (spec §1.3, §2.3)."""
        return self._dev_posterior(parents, domain, sequences, seq_len, split)[0]

    def _dev_posterior(self, parents: list[str], domain: str, sequences: int, seq_len: int,
                       split: str) -> tuple[list[float], int]:
        """(the parents' cached prior on the dev sequences, how many sequences there were)."""
        models, tok = [], None
        for p in parents:
            m, t = self._fresh_model(p)
            models.append(m.eval())
            tok = tok or t
        sample = dev_sequences(self.token_ids(tok, domain, split), sequences, seq_len)
        if not sample:
            raise InvalidExpertError(f"the {split} split of {domain!r} is shorter than one {seq_len}-token sequence")
        prior = estimate_prior(models, sample, decay=0.3, max_sequences=len(sample))
        return [float(x) for x in prior], len(sample)

    def branch(self, expert_id: str, parents: list[str], domain: str | None = None,
               weights: list[float] | None = None, *, prior_split: str = "validation",
               prior_sequences: int = DEV_SEQUENCES, lineage: dict[str, Any] | None = None) -> ExpertRecord:
        """A new expert initialised as the weighted average of `parents` (registered, ready to train, with its
        lineage in the same write); without explicit weights, the parents' posterior on `prior_sequences` dev
        sequences of `domain` (spec §1.3)."""
        if not parents:
            raise InvalidExpertError("branch needs at least one parent expert")
        source: dict[str, Any] = {"kind": "explicit"}
        if weights is None:
            if domain is None or len(parents) == 1:
                weights = [1.0 / len(parents)] * len(parents)
                source = {"kind": "uniform"}
            else:
                weights, used = self._dev_posterior(parents, domain, prior_sequences, 128, prior_split)
                source = {"kind": "estimated", "corpus": domain, "split": prior_split, "sequences": used}
        if len(weights) != len(parents):
            raise InvalidExpertError(f"{len(parents)} parents but {len(weights)} weights")
        recipe = MergeRecipe.model_validate({"method": "linear", "parameters": {"normalize": True},
                                             "experts": [{"id": p, "weight": w} for p, w in zip(parents, weights)]})
        return self.merges.run(recipe, expert_id, tags=["btm", "branch"], domain=domain,
                               extra_lineage={"op": "btm.branch", "weights_source": source, **(lineage or {})})

    def train(self, expert_id: str, source: str, domain: str, budget: TrainConfig, *,
              progress: Progress | None = None, should_stop: ShouldStop | None = None, seed_offset: int = 0,
              resume: bool = False, lineage: dict[str, Any] | None = None) -> ExpertRecord:
        """Continue training `source` on `domain` only; registers the result as `expert_id` (`lineage`
        overrides fields of the recorded lineage, in the same write). With `resume`, the source's saved
        optimizer state and update count are resumed (spec §1.3: a first-round expert is the seed run forked
        onto one domain); `budget` then sets the schedule span (see protocol.plan_budget)."""
        task = self.train_task(expert_id, source, domain, budget, seed_offset=seed_offset, resume=resume,
                               lineage=lineage)
        try:
            lineage = run_train_task(task, progress, should_stop)
        except BaseException:
            self.repo.store.discard(Path(task.staging))
            raise
        return self.register_trained(task, lineage)

    def train_task(self, expert_id: str, source: str, domain: str, budget: TrainConfig, *, seed_offset: int = 0,
                   resume: bool = False, lineage: dict[str, Any] | None = None) -> TrainTask:
        """What `train` does, as plain data any process can run (`run_train_task`), with a new staging dir."""
        full = {"op": "btm.train", "parents": [{"id": source, "weight": 1.0}], "recipe": {"corpus": domain},
                **(lineage or {})}
        return TrainTask(expert_id=expert_id, source=source, source_dir=str(self.repo.artifact_dir(
            self.repo.record(source))), domain=domain, budget=budget, seed_offset=seed_offset, resume=resume,
            corpora_root=str(self.corpora_root), corpus_bytes=self.corpus_bytes,
            staging=str(self.repo.store.new_staging()), lineage=full)

    def register_trained(self, task: TrainTask, lineage: dict[str, Any]) -> ExpertRecord:
        """Validate and register a trained task's staging (discarded on any failure)."""
        return self.repo.register_staged(task.expert_id, Path(task.staging), domain=task.domain,
                                         tags=["btm", task.domain], lineage=lineage)


@dataclass(frozen=True)
class TrainTask:
    """One `BTM.train` as plain data: paths on the shared data dir, the budget, the lineage to record."""

    expert_id: str
    source: str
    source_dir: str
    domain: str
    budget: TrainConfig
    seed_offset: int
    resume: bool
    corpora_root: str
    corpus_bytes: int
    staging: str
    lineage: dict[str, Any]


def run_train_task(task: TrainTask, progress: Progress | None = None,
                   should_stop: ShouldStop | None = None) -> dict[str, Any]:
    """Train `task.source` on its domain into `task.staging` (in this process or a Ray worker); returns the
    lineage to register it with. Leaves the staging to the caller (registered or discarded)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: on first use

    source = Path(task.source_dir)
    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(source, local_files_only=True)
    opt, budget = None, task.budget
    if task.resume:
        opt, state = load_trainer_state(source)
        if opt is None or state is None:
            raise InvalidExpertError(f"{task.source!r} carries no optimizer state to resume")
        budget = resume_config(budget, state)
    root = Path(task.corpora_root)
    train = corpus_ids(root, task.corpus_bytes, tok, task.domain, "train")
    val = corpus_ids(root, task.corpus_bytes, tok, task.domain, "validation")
    lineage = dict(task.lineage)
    train_into(Path(task.staging), model, tok, task.expert_id, train, val, budget, lineage, progress, should_stop,
               seed_offset=task.seed_offset, optimizer_state=opt)
    return lineage


def train_into(staging: Path, model: Any, tok: Any, expert_id: str, train_ids: torch.Tensor,
               val_ids: torch.Tensor | None, budget: TrainConfig, lineage: dict[str, Any],
               progress: Progress | None, should_stop: ShouldStop | None, *, seed_offset: int = 0,
               optimizer_state: dict[str, Any] | None = None, keep_state: bool = False) -> None:
    """Train `model` and save it (with its optimizer state if `keep_state`) into `staging`; adds the
    training's record to `lineage` under "train". JobCancelledError if `should_stop` ended it."""
    def report(p: Any) -> None:
        if progress:
            val = f", val loss {p.val_loss:.3f}" if p.val_loss is not None else ""
            progress(p.fraction, f"{expert_id}: loss {p.train_loss:.3f}{val}, {p.tokens_per_s:,.0f} tok/s, "
                                 f"eta {p.eta_s or 0:.0f}s")

    config = replace(budget, seed=budget.seed + seed_offset)
    result = train_causal_lm(model, train_ids, val_ids, config, on_progress=report,
                             should_stop=should_stop, optimizer_state=optimizer_state)
    if result.cancelled:
        raise JobCancelledError(f"training of {expert_id} was cancelled; nothing was registered")
    save_model_atomic(model, tok, staging)
    if keep_state:
        save_trainer_state(staging, result.optimizer_state, config, result.steps)
    lineage["train"] = {"tokens": result.tokens, "steps": result.steps, "seconds": round(result.elapsed_s, 1),
                        "final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
                        "budget": asdict(config), "resumed": optimizer_state is not None,
                        "start_step": config.start_step}


def ensure_corpus(corpora_root: Path, corpus_bytes: int, domain: str) -> None:
    if domain in DOMAINS:
        build_corpus(domain, corpora_root, corpus_bytes)
    else:
        get_corpus(corpora_root, domain)  # UnknownCorpusError for a name that is neither


def corpus_ids(corpora_root: Path, corpus_bytes: int, tokenizer: Any, domain: str, split: str) -> torch.Tensor:
    """One split of a corpus, tokenized."""
    ensure_corpus(corpora_root, corpus_bytes, domain)
    text = load_split(corpora_root, domain, split)
    if not text.strip():
        raise InvalidExpertError(f"corpus {domain!r} has an empty {split} split")
    return tokenize_text(tokenizer, text)


def _tok_key(tokenizer: Any) -> str:
    return f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
