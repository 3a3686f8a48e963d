"""`EnsembleLM`: a BTM ELMforest that quacks like a Hugging Face causal LM.

`experts.hf.generation` (generate, stream_generate, score_ids) runs it unchanged: `forward` returns
`.logits` that are the mixture's log-probabilities (so `log_softmax` of them is a no-op and
argmax/sampling work) and an opaque `.cache` holding the experts' KV caches plus, per row and per
expert, the running log-likelihood of everything fed so far, so the posterior follows each token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from experts.btm.mixture.posterior import (
    check_mode,
    ema_update,
    mix_log_weights,
    mix_log_weights_outer,
    padded_log_posteriors,
    top_k_experts,
)
from experts.btm.mixture.runners import make_runner
from experts.hf.generation import context_length


@dataclass
class EnsembleConfig:
    """What `experts.hf.generation` reads from a model config, plus the ensemble's settings."""

    n_positions: int
    vocab_size: int
    num_experts: int  # experts in the forest (before top-k)
    top_k: int  # experts that run
    mode: str
    backend: str
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    model_type: str = "btm-ensemble"

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions


@dataclass
class EnsembleCache:
    """Opaque generation state. Rows are independent; `loglik[b, j]` is log p_j(x_1..x_n) of row b."""

    experts: Any  # the runner's per-expert KV state
    loglik: torch.Tensor  # [B, k] running context log-likelihood (tokens after the first)
    last_logprobs: torch.Tensor  # [B, k, V] experts' log-probs after the last fed token
    length: int  # columns fed so far (padding included)
    last_real: torch.Tensor | None = None  # [B] bool: the last fed column is a real token (None: all real)

    def get_seq_length(self) -> int:
        return self.length


@dataclass
class EnsembleOutput:
    logits: torch.Tensor  # [B, T, V] mixture log-probabilities (float32)
    cache: EnsembleCache | None = None
    weights: torch.Tensor | None = None  # [B, T, k] mixture weights used at each position

    @property
    def past_key_values(self) -> EnsembleCache | None:
        return self.cache


def _prior_tensor(prior: Any, n: int) -> torch.Tensor:
    if prior is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    p = torch.as_tensor(prior, dtype=torch.float64).flatten()
    if p.numel() != n:
        raise ValueError(f"prior has {p.numel()} entries for {n} experts")
    return p


class EnsembleLM(torch.nn.Module):
    """Posterior-weighted mixture of k causal LMs sharing one tokenizer (BTM ensemble inference).

    prior: P(D=j) over `models` (the cached prior; None = uniform). top_k: only the k experts with
    the largest prior run (BTM reference code), their prior renormalised. mode: "paper" (posterior
    from the whole context's likelihood) or "reference" (previous token's likelihood x prior, uniform
    at a sequence's first position; with top-k "uniform" is over the k experts that run). backend:
    "auto" | "stacked" | "loop" | "vmap" (see experts/ensemble/runners.py).

    `config.n_positions` is the smallest context of the experts that run. The stacked backend holds
    its own copy of the weights: convert the experts (dtype, device) before building the ensemble,
    not the ensemble afterwards.
    """

    def __init__(self, models: Sequence[Any], prior: Any = None, *, top_k: int | None = None,
                 mode: str = "paper", backend: str = "auto") -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one expert")
        self.mode = check_mode(mode)
        prior_t = _prior_tensor(prior, len(models))
        sel = top_k_experts(prior_t, top_k)
        # an expert with zero prior never gets weight, so it never runs
        self.selected = [int(i) for i in sel.indices if sel.prior[i] > 0]
        self.prior = sel.prior  # full length, zeros outside the top-k
        chosen = [models[i] for i in self.selected]
        modules = all(isinstance(m, torch.nn.Module) for m in chosen)
        self.experts = torch.nn.ModuleList(chosen) if modules else chosen
        self.register_buffer("log_prior", torch.log(sel.prior[self.selected]).float(), persistent=False)
        vocab = {_vocab_size(m) for m in chosen}
        if len(vocab) != 1:
            raise ValueError(f"experts disagree on the vocabulary size: {sorted(vocab)}")
        self.runner = make_runner(list(chosen), backend)
        for i, t in enumerate(getattr(self.runner, "tensors", lambda: [])()):
            self.register_buffer(f"_stacked_{i}", t, persistent=False)  # counted by model_nbytes
        c0 = getattr(chosen[0], "config", None)
        self.config = EnsembleConfig(
            n_positions=min(_context(m) for m in chosen), vocab_size=vocab.pop(), num_experts=len(models),
            top_k=len(chosen), mode=self.mode, backend=self.runner.name,
            bos_token_id=getattr(c0, "bos_token_id", None), eos_token_id=getattr(c0, "eos_token_id", None))

    @property
    def k(self) -> int:
        return len(self.selected)

    def expert_logprobs(self, input_ids: torch.Tensor, state: Any = None, use_cache: bool = False,
                        mask: torch.Tensor | None = None, positions: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, Any]:
        """Each running expert's log-probs [k, B, T, V] (float32) and the runner state."""
        logits, st = self._logits(input_ids, state, use_cache, mask, positions)
        return torch.log_softmax(logits, dim=-1), st

    def _logits(self, input_ids: torch.Tensor, state: Any, use_cache: bool, mask: torch.Tensor | None,
                positions: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """The running experts' logits [k, B, T, V] (float32) and the runner state."""
        if mask is None and positions is None:
            logits, st = self.runner(input_ids, state, use_cache)
        else:
            logits, st = self.runner(input_ids, state, use_cache, mask=mask, positions=positions)
        return logits.float(), st

    def _evidence_last(self, input_ids: torch.Tensor, state: Any, use_cache: bool, mask: torch.Tensor | None,
                       positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(log p_j of each fed token after the first [B, T-1, k], every expert's log-probs at the last position
        [B, k, V], the runner's state) from one log-normaliser per position."""
        logits, state = self._logits(input_ids, state, use_cache, mask, positions)  # [k, B, T, V]
        k, B, T, _ = logits.shape
        last = torch.log_softmax(logits[:, :, -1], dim=-1).permute(1, 0, 2)  # one fused pass
        if T == 1:  # a decode step: no token of this call is scored yet
            return logits.new_zeros(B, 0, k), last, state
        lse = torch.logsumexp(logits[:, :, :-1], dim=-1)  # [k, B, T-1]
        fed = logits[:, :, :-1].gather(-1, input_ids[None, :, 1:, None].expand(k, B, T - 1, 1)).squeeze(-1)
        return (fed - lse).permute(1, 2, 0), last, state

    def forward(self, input_ids: torch.Tensor, use_cache: bool = True, cache: EnsembleCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                last_only: bool = False, **kw: Any) -> EnsembleOutput:
        """Mixture log-probs for every position. With `attention_mask` [B, past + T] (left padding: 0 for
        padding) and `position_ids` [B, T], each row gets exactly what it would get alone: padding is never
        attended to and is no evidence for the posterior."""
        cache = kw.pop("past_key_values", None) if cache is None else cache
        input_ids = torch.as_tensor(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids.unsqueeze(0)
        B, T = input_ids.shape
        if T == 0:
            raise ValueError("input_ids is empty")
        padded = attention_mask is not None and not bool(attention_mask.all())
        if padded and not getattr(self.runner, "pads", False):
            raise NotImplementedError(f"the {self.runner.name} backend does not support padding")
        real = attention_mask[:, -T:].bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool)
        state_in = cache.experts if cache is not None else None
        if last_only:  # the mixture at the last position only: no [B, T, k, V] log-probs are built
            lp = None
            target, last, state = self._evidence_last(input_ids, state_in, use_cache,
                                                      attention_mask if padded else None, position_ids)
        else:
            lp, state = self.expert_logprobs(input_ids, state_in, use_cache, attention_mask if padded else None,
                                             position_ids)
            lp = lp.permute(1, 2, 0, 3)  # [B, T, k, V]
            # log-likelihood of each fed token under each expert; evidence only between two real tokens
            target = lp[:, :-1].gather(-1, input_ids[:, 1:, None, None].expand(B, T - 1, self.k, 1)).squeeze(-1)
            last = lp[:, -1]
        target = torch.cat([target, target.new_zeros(B, 1, self.k)], dim=1)  # last target not fed yet
        valid = torch.cat([real[:, :-1] & real[:, 1:], real.new_zeros(B, 1)], dim=1)
        target = target * valid.unsqueeze(-1)
        before = cache.last_real if cache is not None and cache.last_real is not None else None
        if cache is not None:
            has_prev = real[:, 0] if before is None else real[:, 0] & before
            first = cache.last_logprobs.gather(-1, input_ids[:, :1, None].expand(B, self.k, 1)).squeeze(-1)
            first = first * has_prev.unsqueeze(-1)
            context = first + cache.loglik if self.mode == "paper" else first
        else:
            has_prev = real.new_zeros(B)
            first = target.new_zeros(B, self.k)
            context = None
        # a row's first real token: real, and neither the previous column nor the cached last one is real
        prev_real = torch.cat([has_prev.unsqueeze(1), real[:, :-1]], dim=1)
        starts = (real & ~prev_real).unsqueeze(-1)
        logw = padded_log_posteriors(self.log_prior, target, self.mode, context_loglik=context, starts=starts)
        if lp is not None:
            mixed = mix_log_weights(lp, logw)
        else:  # the same sum over experts, as a reduction over the outer axis of the runner's [k, B, V] layout
            mixed = mix_log_weights_outer(last.transpose(0, 1), logw[:, -1]).unsqueeze(1)
        new_cache = None
        if use_cache:
            prev = cache.loglik if cache is not None else target.new_zeros(B, self.k)
            loglik = prev + first + target[:, :-1].sum(1)
            kept = last if lp is None else last.clone()  # the last-only path's `last` is its own tensor already
            new_cache = EnsembleCache(state, loglik, kept, (cache.length if cache else 0) + T,
                                      real[:, -1].clone() if attention_mask is not None else None)
        return EnsembleOutput(mixed, new_cache, logw.exp())

    def engine_adapter(self) -> Any:
        """How the batching engine runs this forest (experts.hf.engine.kv.BatchAdapter)."""
        return ForestAdapter(self)

    def posterior(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Posterior over the running experts, [B, k]: paper form, P(D=j | the whole sequence);
        reference form, the one-step weights with which the last token was scored."""
        with torch.inference_mode():
            out = self.forward(torch.as_tensor(input_ids), use_cache=True)
            assert out.cache is not None
            if self.mode == "paper":
                return torch.softmax(self.log_prior + out.cache.loglik, dim=-1)
            return out.weights[:, max(0, out.weights.shape[1] - 2)]  # the weights that scored the last token


def _vocab_size(m: Any) -> int:
    out = getattr(m, "get_output_embeddings", lambda: None)()
    if out is not None and hasattr(out, "weight"):
        return int(out.weight.shape[0])
    return int(m.config.vocab_size)


def _context(m: Any) -> int:
    return context_length(m)


def estimate_prior(models: Sequence[Any], sequences: Sequence[Sequence[int]], *, decay: float = 0.3,
                   mode: str = "paper", max_sequences: int = 100, batch_size: int = 1,
                   backend: str = "auto", return_history: bool = False) -> Any:
    """The cached prior (spec §2.3): EMA (α = decay, pandas adjust=False) of per-batch posteriors on
    held-out sequences of the target data, then frozen.

    Starts from a uniform prior; each batch is scored with the running prior (as the reference
    `updating_prior` pass does). A sequence's posterior is, in "paper" mode, P(D=j | the whole
    sequence); in "reference" mode the one-step weights with which its last token is scored
    (the reference code's `weights[:, :, -1]`). A batch's posterior is
    the mean over its sequences. Sequences longer than the experts' context are cut to it; those
    with fewer than 2 tokens are skipped. Returns the prior over all `models` (float64), and with
    `return_history` also the list of running priors."""
    mode = check_mode(mode)
    ens = EnsembleLM(models, None, mode=mode, backend=backend)
    ctx = ens.config.n_positions
    seqs = [list(s)[:ctx] for s in sequences if len(s) >= 2][:max_sequences]
    if not seqs:
        raise ValueError("estimate_prior needs at least one held-out sequence of 2 or more tokens")
    prior: torch.Tensor | None = None
    uniform = torch.full((len(models),), 1.0 / len(models), dtype=torch.float64)
    history: list[torch.Tensor] = []
    for start in range(0, len(seqs), batch_size):
        current = prior if prior is not None else uniform
        ens.log_prior = torch.log(current).float()
        posts = [ens.posterior(torch.tensor([s]))[0].double() for s in seqs[start:start + batch_size]]
        prior = ema_update(prior, torch.stack(posts).mean(0), decay)
        history.append(prior)
    assert prior is not None
    return (prior, history) if return_history else prior


class ForestAdapter:
    """The engine's view of a forest: its forward, and its cache's row and column operations."""

    def __init__(self, model: EnsembleLM) -> None:
        self.model = model
        self.runner = model.runner
        self.paddable = bool(getattr(model.runner, "pads", False))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None, cache: Any,
                last_only: bool, rows: Any = None) -> tuple[torch.Tensor, Any]:
        if rows is not None and any(r is not None for r in rows):
            raise NotImplementedError("LoRA adapters on a forest are not served")
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                         last_only=last_only)
        return out.logits, out.cache

    @staticmethod
    def _real(c: EnsembleCache) -> torch.Tensor:
        return c.last_real if c.last_real is not None else torch.ones(c.loglik.shape[0], dtype=torch.bool)

    def select(self, c: EnsembleCache, rows: torch.Tensor) -> EnsembleCache:
        return EnsembleCache(self.runner.select(c.experts, rows), c.loglik[rows], c.last_logprobs[rows], c.length,
                             self._real(c)[rows])

    def join(self, a: EnsembleCache, pad_a: int, b: EnsembleCache, pad_b: int) -> EnsembleCache:
        return EnsembleCache(self.runner.join(a.experts, pad_a, b.experts, pad_b), torch.cat([a.loglik, b.loglik]),
                             torch.cat([a.last_logprobs, b.last_logprobs]), a.length + pad_a,
                             torch.cat([self._real(a), self._real(b)]))

    def place(self, c: EnsembleCache, slots: torch.Tensor, new: EnsembleCache, pad: int) -> EnsembleCache:
        c.loglik[slots] = new.loglik
        c.last_logprobs[slots] = new.last_logprobs
        real = self._real(c).clone()
        real[slots] = self._real(new)
        return EnsembleCache(self.runner.place(c.experts, slots, new.experts, pad), c.loglik, c.last_logprobs,
                             c.length, None if bool(real.all()) else real)

    def release(self) -> None:
        pass  # a forest keeps nothing between steps outside its cache

    def trim_left(self, c: EnsembleCache, n: int) -> EnsembleCache:
        if n <= 0:
            return c
        return EnsembleCache(self.runner.trim_left(c.experts, n), c.loglik, c.last_logprobs, c.length - n, c.last_real)
