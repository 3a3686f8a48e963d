"""The measuring side of the Evo-Merging reproduction (:mod:`bench.evo_repro`).

:class:`Metered` is one method's budgeted view of the validation session; :class:`WhiteBox` is a
private copy of the base holding the pool's LoRA factors, which writes W = W0 + dW into it and scores
batches (loss, token accuracy, exact match), for the white-box merges and the test-split numbers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from merging.lora import evo_lora, lora_modules, lora_scaling
from merging.methods import merge_tensor

__all__ = ["Metered", "WhiteBox"]


class Metered:
    """One method's view of the validation session: an Evaluator that refuses more than `budget` queries.
    White-box validation evaluations are counted here too (`take`)."""

    def __init__(self, session: Any, budget: int) -> None:
        self.session, self.budget, self.used, self.n = session, budget, 0, session.n

    def take(self, k: int = 1) -> None:
        if self.used + k > self.budget:
            raise RuntimeError(f"method over budget: {self.used} + {k} > {self.budget}")
        self.used += k

    def evaluate(self, alpha: Any, beta: Any) -> float:
        self.take(1)
        return self.session.evaluate(alpha, beta)

    def evaluate_many(self, candidates: list[tuple[Any, Any]]) -> list[float]:
        self.take(len(candidates))
        return self.session.evaluate_many(candidates)


class WhiteBox:
    """A private copy of the base with the pool's factors: writes W = W0 + dW into it and scores batches."""

    def __init__(self, base_dir: Path, adapter_dirs: list[Path]) -> None:
        # heavy: imported when a white box is built
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        from transformers.pytorch_utils import Conv1D

        model = AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32,
                                                     use_safetensors=True)
        self.model = model.eval().requires_grad_(False)
        self.adapters = [load_file(str(d / "adapter_model.safetensors")) for d in adapter_dirs]
        self.s = lora_scaling(json.loads((adapter_dirs[0] / "adapter_config.json").read_text()))
        self.modules = []  # (a_key, b_key, weight, W0, Conv1D-transposed)
        for a_key, b_key in lora_modules(self.adapters[0].keys()).values():
            m = self.model.get_submodule(a_key.split(".lora_A")[0].removeprefix("base_model.model."))
            self.modules.append((a_key, b_key, m.weight.data, m.weight.data.clone(), isinstance(m, Conv1D)))
        self._stacks: list[torch.Tensor] | None = None
        self._mixed: dict[tuple[Any, ...], list[torch.Tensor]] = {}

    @property
    def n(self) -> int:
        return len(self.adapters)

    def stacks(self) -> list[torch.Tensor]:
        """Per module the (N, out, in) stack of dW_i = s B_i A_i (computed once)."""
        if self._stacks is None:
            self._stacks = [torch.stack([self.s * ad[b] @ ad[a] for ad in self.adapters])
                            for a, b, *_ in self.modules]
        return self._stacks

    def evo_deltas(self, alpha: list[float], beta: list[float]) -> list[torch.Tensor]:
        """dW = s B A with A = sum beta_i S_alpha_i(A_i), B = sum beta_i B_i (the reference operator)."""
        out = []
        for a_key, b_key, *_ in self.modules:
            a_i, b_i = [ad[a_key] for ad in self.adapters], [ad[b_key] for ad in self.adapters]
            a, b = evo_lora(a_i, b_i, alpha, beta)
            out.append(self.s * b @ a)
        return out

    def mixed(self, method: str, subset: tuple[int, ...], density: float, seed: int) -> list[torch.Tensor]:
        """The merge library's `method` on the task vectors dW_i (i in subset), lambda = 1; cached."""
        key = (method, subset, density)
        if key not in self._mixed:
            g = torch.Generator().manual_seed(seed)
            params = {"lambda": 1.0, "normalize": method != "task_arithmetic"}
            per = [{"weight": 1.0, "density": density}] * len(subset)
            if method == "task_arithmetic":
                per = [{"weight": 1.0}] * len(subset)
            self._mixed[key] = [merge_tensor(method, torch.zeros(st.shape[1:]), [st[i] for i in subset], per,
                                             params, g) for st in self.stacks()]
        return self._mixed[key]

    def set(self, deltas: list[torch.Tensor] | None, scale: float = 1.0) -> None:
        """W = W0 + scale * dW per module (None: the base)."""
        with torch.no_grad():
            for (_, _, w, w0, transposed), d in zip(self.modules, deltas or [None] * len(self.modules),
                                                     strict=True):
                if d is None:
                    w.copy_(w0)
                else:
                    torch.add(w0, d.t() if transposed else d, alpha=scale, out=w)

    def score(self, batches: list[Any]) -> dict[str, float]:
        """Loss (mean token CE over scored tokens), token accuracy and exact match on `batches`."""
        total, tokens, hits, exact, examples = 0.0, 0, 0, 0, 0
        backbone, head = self.model.base_model, self.model.get_output_embeddings()
        with torch.inference_mode():
            for b in batches:
                hidden = backbone(input_ids=b.ids, use_cache=False).last_hidden_state  # (B, T, H)
                logits = head(hidden[:, :-1][b.mask]).float()  # (K, V)
                total += float(F.cross_entropy(logits, b.targets, reduction="sum").double())
                hit = logits.argmax(-1) == b.targets
                rows = b.mask.nonzero()[:, 0]  # the example of each scored position (mask order)
                wrong = torch.zeros(b.ids.shape[0]).index_add_(0, rows, (~hit).float())
                tokens, hits = tokens + b.n_targets, hits + int(hit.sum())
                exact, examples = exact + int((wrong == 0).sum()), examples + b.ids.shape[0]
        return {"loss": total / tokens, "token_acc": hits / tokens, "exact": exact / examples}
