"""mergekit configs on `/admin/merges`: parse the YAML, resolve model references, import server paths.

A reference is a registered expert id, or an absolute directory on the server. A directory is imported
once as an expert named after it (lineage `{"op": "import", "path": ...}`), so the merged expert's
lineage names registered parents; a later config naming the same directory reuses that expert.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from app.services.admin import AdminService
from experts.errors import ExpertNotFoundError
from merging.errors import InvalidRecipeError
from merging.mergekit_config import from_mergekit
from merging.recipe import MergeRecipe, load_recipe

_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


def parse_config(config: str | dict[str, Any]) -> dict[str, Any]:
    """The config as a mapping: a string is YAML (or JSON, which is YAML)."""
    if isinstance(config, dict):
        return config
    try:
        data = yaml.safe_load(config)
    except yaml.YAMLError as e:
        raise InvalidRecipeError(f"mergekit_config: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InvalidRecipeError("mergekit_config: the YAML must be a mapping with merge_method and models")
    return data


def import_id(path: Path) -> str:
    """The expert id a server directory is imported as: its name, made a valid id."""
    return (_UNSAFE.sub("-", path.name).lstrip("._:-") or "model")[:128]


class MergekitRefs:
    def __init__(self, admin: AdminService) -> None:
        self.admin = admin
        self.imports: dict[str, str] = {}  # expert id -> server directory still to import

    def _imported_from(self, expert_id: str) -> str | None:
        try:
            lineage = self.admin.repo.registry.get_expert(expert_id).lineage or {}
        except ExpertNotFoundError:
            return None
        return lineage.get("path") if lineage.get("op") == "import" else None

    def resolve(self, ref: str, field: str) -> str:
        if self.admin.repo.registry.has_expert(ref):
            return ref
        path = Path(ref)
        if not path.is_absolute():
            raise InvalidRecipeError(f"mergekit config: {field}: no registered expert {ref!r} (give a registered "
                                     "expert id or an absolute directory on the server)")
        if not path.is_dir():
            raise InvalidRecipeError(f"mergekit config: {field}: {ref!r} is not a directory on the server")
        eid = import_id(path)
        taken = self.imports.get(eid, self._imported_from(eid))
        if taken is None and self.admin.repo.registry.has_expert(eid) or taken not in (None, str(path)):
            raise InvalidRecipeError(
                f"mergekit config: {field}: {ref!r} would be imported as expert {eid!r}, which already exists "
                "and was not imported from there; register the directory under another id and use that id")
        if taken is None:
            self.imports[eid] = str(path)
        return eid

    async def translate(self, config: str | dict[str, Any], *, import_paths: bool) -> MergeRecipe:
        recipe = load_recipe(from_mergekit(parse_config(config), self.resolve))  # every refusal first
        if self.imports and not import_paths:
            eid, path = next(iter(self.imports.items()))
            raise InvalidRecipeError(f"mergekit config: {path!r} is not imported yet (POST /admin/merges imports "
                                     f"it as expert {eid!r}; or register it first)")
        for eid, path in self.imports.items():
            await self.admin.register_path(eid, path, tags=["imported"], domain=None, background=False,
                                           lineage={"op": "import", "path": path})
        return recipe
