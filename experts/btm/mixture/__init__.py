"""BTM ensemble inference: posterior-weighted mixtures of expert LMs (spec: shared/specs/btm.md §2).

- `posterior`: the maths as pure functions (Bayes posterior in the paper's and the reference
  code's form, logsumexp mixture, cached-prior EMA, top-k by prior).
- `runners`: running k experts together (stacked GPT-2, naive loop, torch.func vmap).
- `model`: `EnsembleLM`, an HF-causal-LM look-alike that `experts.hf.generation` serves unchanged,
  and `estimate_prior`.
"""

from experts.btm.mixture.model import EnsembleCache, EnsembleConfig, EnsembleLM, EnsembleOutput, estimate_prior
from experts.btm.mixture.posterior import (
    MODES,
    TopK,
    bayes_log_posterior,
    bayes_posterior,
    cached_prior,
    ema_update,
    mix_log_weights,
    mix_log_weights_outer,
    mix_logprobs,
    reference_posterior,
    sequence_log_posteriors,
    sequence_posteriors,
    top_k_experts,
)
from experts.btm.mixture.runners import BACKENDS, make_runner

__all__ = [
    "BACKENDS", "MODES", "EnsembleCache", "EnsembleConfig", "EnsembleLM", "EnsembleOutput", "TopK",
    "bayes_log_posterior", "bayes_posterior", "cached_prior", "ema_update", "estimate_prior", "make_runner",
    "mix_log_weights", "mix_log_weights_outer", "mix_logprobs", "reference_posterior", "sequence_log_posteriors",
    "sequence_posteriors",
    "top_k_experts",
]
