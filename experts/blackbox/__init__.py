"""Black-box ensembles: local and remote experts combined through what an OpenAI API returns.

- `spec`: the stored spec (`mode`, weighted `members`, `candidates`, `top_logprobs`), validation,
  registration and weight changes.
- `maths`: the two rules as pure functions (score_select's weighted length-normalised
  log-likelihood, token_mix's renormalised mixture over the union of top-k).
- `members`: local and remote members behind one async interface.
- `ensemble`: `BlackBoxEnsemble`, what the API layer serves.
"""

from experts.blackbox.ensemble import BlackBoxEnsemble, EnsembleEnd, word_chunks
from experts.blackbox.maths import EOS, Dist, candidate_logprobs, choose, mix, select, weighted_score
from experts.blackbox.spec import (
                                   MODES,
                                   BlackBoxSpec,
                                   MemberSpec,
                                   build_spec,
                                   create_blackbox,
                                   is_blackbox,
                                   update_blackbox,
)

__all__ = ["EOS", "MODES", "BlackBoxEnsemble", "BlackBoxSpec", "Dist", "EnsembleEnd", "MemberSpec", "build_spec",
           "candidate_logprobs", "choose", "create_blackbox", "is_blackbox", "mix", "select", "update_blackbox",
           "weighted_score", "word_chunks"]
