"""Merge use-cases: validate a recipe (400 before any work), preview it, run it as a job."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from app.services.admin import AdminService
from app.services.mergekit_refs import MergekitRefs
from experts.hf.threads import run_sync
from experts.repository.jobs import JobContext
from experts.repository.merges import MergeRunner
from merging.methods import METHODS
from merging.recipe import MergeRecipe, load_recipe


class MergeService:
    def __init__(self, admin: AdminService) -> None:
        self.admin = admin
        self.runner = MergeRunner(admin.repo)

    @staticmethod
    def methods() -> list[dict[str, Any]]:
        return [{"name": m.name, "needs_base": m.needs_base, "lora": m.lora, "reference": m.reference_url,
                 "parameters": [asdict(p) for p in m.params]} for m in METHODS.values()]

    async def recipe(self, recipe_data: dict[str, Any] | None, mergekit_config: str | dict[str, Any] | None, *,
                     import_paths: bool) -> MergeRecipe:
        """The recipe given, or the one a mergekit config translates to (its server paths imported as
        experts first when `import_paths`; otherwise they must have been imported already)."""
        if recipe_data is not None:
            return load_recipe(recipe_data)
        assert mergekit_config is not None
        return await MergekitRefs(self.admin).translate(mergekit_config, import_paths=import_paths)

    async def preview(self, recipe_data: dict[str, Any] | None, output_id: str | None,
                      mergekit_config: str | dict[str, Any] | None = None) -> dict[str, Any]:
        recipe = await self.recipe(recipe_data, mergekit_config, import_paths=False)
        est = await run_sync(self.runner.preflight, recipe, output_id)
        return {"valid": True, "method": recipe.method, "recipe": _resolved(recipe), **est}

    async def start(self, output_id: str, recipe_data: dict[str, Any] | None, *, tags: list[str],
                    domain: str | None, background: bool,
                    mergekit_config: str | dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        if mergekit_config is not None:
            self.admin.check_new_id(output_id)  # before any server path is imported
        recipe = await self.recipe(recipe_data, mergekit_config, import_paths=True)
        await run_sync(self.runner.preflight, recipe, output_id)  # every refusal happens here, as a 4xx

        def run(ctx: JobContext) -> dict[str, Any]:
            record = self.runner.run(recipe, output_id, tags=tags, domain=domain,
                                     progress=lambda f, msg: ctx.progress(f, msg))
            return {"expert": record.id}

        job = self.admin.submit("merge", {"id": output_id, "recipe": recipe.model_dump(mode="json"),
                                          "tags": tags}, run)
        return await self.admin.finish(job, background)


def _resolved(recipe: MergeRecipe) -> dict[str, Any]:
    d = recipe.model_dump(mode="json")
    d["parameters"] = recipe.resolved_parameters()
    d["experts"] = [{"id": e.id, **p, **({"per_tensor": d["experts"][i]["per_tensor"]} if e.per_tensor else {})}
                    for i, (e, p) in enumerate(zip(recipe.experts, recipe.expert_parameters(), strict=True))]
    return d
