"""Running merge recipes against the repository: resolve experts, check, merge tensor by tensor, register.

The math lives in `merging/` (pure); this module does the I/O around it. The output is assembled
in a staging directory (config and tokenizer from the reference model, weights streamed into one
safetensors file) and registered atomically with the recipe as its lineage, so every merged
expert says exactly how it was made and can be rebuilt.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from experts.errors import ExpertExistsError, InvalidExpertError
from experts.hf.st_writer import StreamingSafetensorsWriter
from experts.hf.validation import model_files
from experts.repository.registry import ExpertRecord
from experts.repository.repo import ExpertRepository
from experts.repository.store import check_expert_id
from merging.apply import check_tokenizers, estimate, merge_tensors
from merging.errors import IncompatibleExpertsError
from merging.recipe import MergeRecipe
from merging.sources import SafetensorsSource, TensorSource, tensor_meta

Progress = Callable[[float, str], None]
MERGEABLE_KINDS = ("local", "lora")


class MergeRunner:
    def __init__(self, repo: ExpertRepository) -> None:
        self.repo = repo

    def _participants(self, recipe: MergeRecipe) -> list[str]:
        ids = list(recipe.expert_ids)
        if recipe.base is not None and recipe.base not in ids:
            ids.insert(0, recipe.base)
        return ids

    def _resolve(self, recipe: MergeRecipe) -> tuple[dict[str, ExpertRecord], dict[str, TensorSource]]:
        records = {i: self.repo.record(i) for i in self._participants(recipe)}  # 404 for unknown ids
        for r in records.values():
            if r.kind not in MERGEABLE_KINDS or not r.path:
                raise InvalidExpertError(f"expert {r.id!r} is of kind {r.kind!r}; only local and lora experts "
                                         "have weights to merge")
        sources = {i: SafetensorsSource(self.repo.artifact_dir(r)) for i, r in records.items()}
        return records, sources

    def preflight(self, recipe: MergeRecipe, output_id: str | None = None) -> dict[str, Any]:
        """All checks, no work: returns the estimate (tensors, output bytes, peak working bytes)."""
        if output_id is not None:
            check_expert_id(output_id)
            if self.repo.registry.has_expert(output_id):
                raise ExpertExistsError(output_id)
        records, sources = self._resolve(recipe)
        check_tokenizers({i: r.tokenizer_fingerprint for i, r in records.items()},
                         allow_mismatch=recipe.allow_tokenizer_mismatch)
        self._check_lora_bases({i: records[i] for i in recipe.expert_ids})
        est = estimate(recipe, sources)
        return {**est, "experts": list(records), "input_bytes": sum(r.size_bytes or 0 for r in records.values())}

    def _check_lora_bases(self, records: dict[str, ExpertRecord]) -> str | None:
        kinds = {r.kind for r in records.values()}
        if "lora" not in kinds:
            return None
        if kinds != {"lora"}:
            raise IncompatibleExpertsError("cannot merge LoRA adapters with full models")
        bases = {r.spec.get("base") for r in records.values()}
        if len(bases) != 1:
            raise IncompatibleExpertsError(
                f"LoRA experts on different bases cannot be merged: {sorted(map(str, bases))}")
        ranks = {r.spec.get("rank") for r in records.values()}
        targets = {tuple(r.spec.get("target_modules") or []) for r in records.values()}
        if len(targets) != 1:
            raise IncompatibleExpertsError("LoRA experts with different target modules cannot be merged")
        del ranks  # different ranks are fine for linear/cat; evo checks shapes per module
        return next(iter(bases))

    def run(self, recipe: MergeRecipe, output_id: str, *, tags: list[str] | None = None,
            domain: str | None = None, progress: Progress | None = None,
            extra_lineage: dict[str, Any] | None = None) -> ExpertRecord:
        """Merge and register `output_id`; its lineage is the recipe plus `extra_lineage` (one write)."""
        self.preflight(recipe, output_id)
        records, sources = self._resolve(recipe)
        lora_base = self._check_lora_bases({i: records[i] for i in recipe.expert_ids})
        if lora_base is not None:
            return self._run_lora(recipe, output_id, records, sources, lora_base, tags, domain, progress,
                                  extra_lineage or {})
        ref_id = recipe.base if recipe.base is not None and recipe.merge_method.uses_base(recipe.base) \
            else recipe.expert_ids[0]
        staging = self.repo.store.new_staging()
        try:
            self._copy_non_weights(self.repo.artifact_dir(records[ref_id]), staging, recipe.dtype)
            self._write_weights(recipe, sources, ref_id, staging / "model.safetensors", progress)
        except BaseException:
            self.repo.store.discard(staging)
            raise
        weights = {e.id: p.get("weight", p.get("beta"))
                   for e, p in zip(recipe.experts, recipe.expert_parameters(), strict=True)}
        lineage = {"op": "merge", "parents": [{"id": i, "weight": weights.get(i)} for i in recipe.expert_ids],
                   "base": recipe.base, "recipe": recipe.model_dump(mode="json"), **(extra_lineage or {})}
        if progress:
            progress(0.99, "registering")
        return self.repo.register_staged(output_id, staging, tags=tags, domain=domain, lineage=lineage,
                                         kind=records[recipe.expert_ids[0]].kind)

    def _run_lora(self, recipe: MergeRecipe, output_id: str, records: dict[str, ExpertRecord],
                  sources: dict[str, TensorSource], base: str, tags: list[str] | None, domain: str | None,
                  progress: Progress | None, extra_lineage: dict[str, Any]) -> ExpertRecord:
        """Adapters are small: merge module by module in memory, write one adapter file."""
        staging = self.repo.store.new_staging()
        try:
            tensors, cfg = self.lora_tensors(recipe, progress)
            save_file(tensors, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
            (staging / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
        except BaseException:
            self.repo.store.discard(staging)
            raise
        lineage = {"op": "merge", "parents": [{"id": e.id, "weight": p.get("weight", p.get("beta"))}
                                              for e, p in zip(recipe.experts, recipe.expert_parameters(), strict=True)],
                   "base": base, "recipe": recipe.model_dump(mode="json"), **extra_lineage}
        return self.repo.register_adapter(output_id, staging, base=base, tags=tags, domain=domain, lineage=lineage)

    def lora_tensors(self, recipe: MergeRecipe, progress: Progress | None = None
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
        """A LoRA merge in memory: the merged adapter's tensors and adapter_config.json (what `run`
        registers, and what a request-time mix serves: the same numbers)."""
        records, sources = self._resolve(recipe)
        first = self.repo.artifact_dir(records[recipe.expert_ids[0]])

        def on_tensor(i: int, n: int, name: str) -> None:
            if progress:
                progress(0.98 * i / max(n, 1), f"tensor {i + 1}/{n}: {name}")

        tensors = dict(merge_tensors(recipe, {i: sources[i] for i in recipe.expert_ids}, on_tensor))
        cfg = json.loads((first / "adapter_config.json").read_text())
        if recipe.method in ("linear", "cat"):  # peft's forms carry their scaling in the factors
            rank = next(t.shape[0] for k, t in tensors.items() if "lora_A" in k)
            cfg["r"] = cfg["lora_alpha"] = int(rank)
            cfg.pop("rank_pattern", None), cfg.pop("alpha_pattern", None)
        return tensors, cfg

    @staticmethod
    def _copy_non_weights(src: Path, dst: Path, dtype: str | None) -> None:
        for f in model_files(src):
            if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copy2(f, dst / f.name)
        cfg = dst / "config.json"
        if dtype is not None and cfg.is_file():
            data = json.loads(cfg.read_text())
            data["torch_dtype"] = data["dtype"] = dtype
            cfg.write_text(json.dumps(data, indent=2))

    @staticmethod
    def _write_weights(recipe: MergeRecipe, sources: dict[str, TensorSource], ref_id: str, out: Path,
                       progress: Progress | None) -> None:
        def on_tensor(i: int, n: int, name: str) -> None:
            if progress:
                progress(0.98 * i / max(n, 1), f"tensor {i + 1}/{n}: {name}")

        stream = merge_tensors(recipe, sources, on_tensor)
        ref = sources[ref_id]
        out_dtype = recipe.torch_dtype
        layout = []
        for name in ref.keys():  # noqa: SIM118 (a TensorSource, not a dict)
            shape, dt = tensor_meta(ref, name)
            layout.append((name, tuple(shape), out_dtype if out_dtype is not None and dt.is_floating_point else dt))
        with StreamingSafetensorsWriter(out, layout) as w:
            for name, tensor in stream:
                w.write(name, tensor)
