"""BTM ensemble maths as pure functions: tensors in, tensors out (no models, no state).

Notation: `k` experts, `V` vocabulary, `T` scored positions. `target_loglik[..., t, j]` is
log p_j(x_{t+1} | x_<=t), expert j's log-probability of the token that actually follows position t.
Spec: /work/shared/specs/btm.md §2.1-2.3 (hand-computed vectors in §6).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

MODES = ("paper", "reference")
_ALIASES = {"paper": "paper", "cumulative": "paper", "reference": "reference", "one_step": "reference"}


def check_mode(mode: str) -> str:
    """'paper' (alias 'cumulative') or 'reference' (alias 'one_step')."""
    try:
        return _ALIASES[mode]
    except KeyError:
        raise ValueError(f"unknown posterior mode {mode!r}; use one of {MODES}") from None


# BTM paper §2 (spec §2.1): P(D=j | x_<t) ∝ P(x_<t | D=j) · P(D=j), the whole context's likelihood.
def bayes_log_posterior(log_prior: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    """log P(D=j | context) from log P(D=j) [k] and log P(context | D=j) [..., k]; normalised in log space."""
    return torch.log_softmax(log_prior + loglik, dim=-1)


# BTM paper §2 (spec §2.1), probability form of `bayes_log_posterior`.
def bayes_posterior(log_prior: torch.Tensor, loglik: torch.Tensor) -> torch.Tensor:
    """P(D=j | context) ∝ exp(loglik_j) · prior_j, over the last axis."""
    return bayes_log_posterior(log_prior, loglik).exp()


# Reference code (DEMix/BTM `sequence_scorer.py`, spec §2.2): w_t ∝ π · P(x_{t-1}), previous token only.
def reference_posterior(log_prior: torch.Tensor, prev_token_loglik: torch.Tensor) -> torch.Tensor:
    """One-step Bayes update that restarts from the prior: prior_j · p_j(previous token), normalised.

    The reference code uses uniform weights at the first position of a block (nothing precedes it);
    `sequence_posteriors(..., mode="reference")` does that."""
    return torch.softmax(log_prior + prev_token_loglik, dim=-1)


def sequence_log_posteriors(log_prior: torch.Tensor, target_loglik: torch.Tensor, mode: str = "paper",
                            *, context_loglik: torch.Tensor | None = None,
                            first_has_evidence: bool = False) -> torch.Tensor:
    """Log mixture weights [..., T, k] for every scored position of a sequence.

    paper (spec §2.1): position t uses Σ_{s<t} target_loglik[s] (+ `context_loglik`, the log-likelihood
    of context scored earlier), i.e. the whole context. reference (spec §2.2): position t uses
    target_loglik[t-1] only; position 0 is uniform unless `first_has_evidence` (then `context_loglik`
    is the previous token's log-likelihood, as when a KV-cached sequence continues)."""
    starts = None
    if not first_has_evidence:
        starts = torch.zeros(target_loglik.shape[-2], 1, dtype=torch.bool)
        starts[0] = True
    return padded_log_posteriors(log_prior, target_loglik, mode, context_loglik=context_loglik, starts=starts)


# Spec §2.1/§2.2 for left-padded batches: the same weights as each row scored alone from its first token.
def padded_log_posteriors(log_prior: torch.Tensor, target_loglik: torch.Tensor, mode: str = "paper", *,
                          context_loglik: torch.Tensor | None = None,
                          starts: torch.Tensor | None = None) -> torch.Tensor:
    """`sequence_log_posteriors` with per-row starts: `target_loglik` is 0 wherever it is not evidence
    (padding, or a token whose predecessor is padding); `starts` [..., T, 1] (bool) marks each row's first
    real token, where the reference form is uniform (the paper form needs nothing: no evidence is the prior)."""
    mode = check_mode(mode)
    k = target_loglik.shape[-1]
    zero = torch.zeros_like(target_loglik[..., :1, :])
    prev = torch.cat([zero, target_loglik[..., :-1, :]], dim=-2)  # prev[t] = target_loglik[t-1], 0 at t=0
    if context_loglik is not None:
        ctx = context_loglik.unsqueeze(-2).to(target_loglik.dtype)
    else:
        ctx = torch.zeros_like(zero)
    if mode == "paper":
        return bayes_log_posterior(log_prior, torch.cumsum(prev, dim=-2) + ctx)
    evidence = torch.cat([ctx.expand_as(zero), prev[..., 1:, :]], dim=-2)
    logw = torch.log_softmax(log_prior + evidence, dim=-1)
    if starts is not None:  # uniform at the first position of a sequence
        logw = torch.where(starts, torch.full_like(logw, -math.log(k)), logw)
    return logw


# Spec §2.1/§2.2 per position; the weights with which each scored token is predicted.
def sequence_posteriors(log_prior: torch.Tensor, target_loglik: torch.Tensor, mode: str = "paper"
                        ) -> torch.Tensor:
    """Mixture weights [..., T, k] for a sequence scored from its start (see `sequence_log_posteriors`)."""
    return sequence_log_posteriors(log_prior, target_loglik, mode).exp()


# BTM paper §2 (spec §2.1): log p(x) = log Σ_j w_j p_j(x), by logsumexp over experts (stable).
def mix_log_weights(expert_logprobs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """expert_logprobs [..., k, V], log_weights [..., k] -> log Σ_j w_j p_j [..., V]."""
    return torch.logsumexp(expert_logprobs + log_weights.unsqueeze(-1), dim=-2)


# BTM paper §2 (spec §2.1): the same log Σ_j w_j p_j, with the experts on the outer axis (a runner's layout).
def mix_log_weights_outer(expert_logprobs: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """expert_logprobs [k, B, V], log_weights [B, k] -> log Σ_j w_j p_j [B, V]. One temporary of the input's
    size, reduced in place (torch.logsumexp over an outer axis makes several, and is ~1.5x slower)."""
    z = expert_logprobs + log_weights.t().unsqueeze(-1)
    m = z.amax(dim=0)
    m = m.masked_fill_(torch.isinf(m), 0.0)  # a token every expert rules out stays -inf (no inf - inf)
    return z.sub_(m).exp_().sum(dim=0).log_().add_(m)


# BTM paper §2 (spec §2.1): mixture Σ_j P(D=j | x_<t) · p_j(x_t | x_<t), returned as log-probabilities.
def mix_logprobs(expert_logprobs: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """expert_logprobs [..., k, V] (log-probs), posterior [..., k] (probabilities)
    -> log Σ_j w_j p_j [..., V]."""
    return mix_log_weights(expert_logprobs, torch.log(posterior.to(expert_logprobs.dtype)))


# Reference code: pandas `ewm(alpha=decay, adjust=False)` step (`ensemble_eval_lm.py:274`, spec §2.3).
def ema_update(prior: torch.Tensor | None, posterior: torch.Tensor, decay: float = 0.3) -> torch.Tensor:
    """prior_0 = post_0; prior_n = (1 - decay) · prior_{n-1} + decay · post_n."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    return posterior.clone() if prior is None else (1.0 - decay) * prior + decay * posterior


# Reference code (spec §2.3): the cached prior is the EMA (α = decay) of per-batch posteriors, then frozen.
def cached_prior(per_sequence_posteriors: torch.Tensor, decay: float = 0.3) -> torch.Tensor:
    """EMA over the first axis of [N, k] posteriors; returns the final (frozen) prior [k]."""
    posts = torch.as_tensor(per_sequence_posteriors)
    if posts.ndim != 2 or posts.shape[0] == 0:
        raise ValueError("per_sequence_posteriors must be a non-empty [N, k] tensor")
    prior = None
    for post in posts:
        prior = ema_update(prior, post, decay)
    assert prior is not None
    return prior


class TopK(NamedTuple):
    indices: torch.Tensor  # kept experts, ascending expert order
    prior: torch.Tensor  # full-length prior, zero outside `indices`, renormalised


# Reference code `ensemble_eval_lm.py` ~344-347 (spec §2.2): keep the k largest prior entries, renormalise.
def top_k_experts(prior: torch.Tensor, k: int | None) -> TopK:
    """Top-k by prior (ties: the lower index wins); k None or >= len keeps all."""
    prior = torch.as_tensor(prior)
    if prior.ndim != 1 or prior.numel() == 0:
        raise ValueError("prior must be a non-empty 1-D tensor")
    if (prior < 0).any() or not torch.isfinite(prior).all() or float(prior.sum()) <= 0:
        raise ValueError("prior must be finite, non-negative and not all zero")
    n = prior.numel()
    if k is None or k >= n:
        k = n
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    order = torch.sort(prior, descending=True, stable=True).indices[:k]
    keep = torch.sort(order).values
    out = torch.zeros_like(prior)
    out[keep] = prior[keep] / prior[keep].sum()
    return TopK(keep, out)
