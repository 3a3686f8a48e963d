"""mergekit configs, as written for `mergekit-yaml`, on POST /admin/merges: the result equals mergekit's own
merge of the same config (the fixtures have the shapes of mergekit's examples), and what is not supported is a
400 naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tests.helpers import build_model_dir

CONFIGS = Path(__file__).resolve().parents[1] / "merging" / "mergekit_configs"
IDS = {"BASE": "mk-base", "EXPERT_A": "mk-a", "EXPERT_B": "mk-b", "EXPERT_C": "mk-c"}


@pytest.fixture(scope="module")
def mk_dirs(gateway, tmp_path_factory, tokenizer):
    """A base and three experts (base + a task-like perturbation), 3 layers so gradients have a middle."""
    root = tmp_path_factory.mktemp("mk-experts")
    base = build_model_dir(root / "base", tokenizer=tokenizer, n_layer=3, n_embd=48, seed=40)
    dirs = {"BASE": base}
    for i, key in enumerate(("EXPERT_A", "EXPERT_B", "EXPERT_C")):
        d = build_model_dir(root / key.lower(), tokenizer=tokenizer, n_layer=3, n_embd=48, seed=40)
        tensors = load_file(d / "model.safetensors")
        gen = torch.Generator().manual_seed(i)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs[key] = d
    for key in ("BASE", "EXPERT_B", "EXPERT_C"):  # EXPERT_A is referred to by its server path
        gateway.register(IDS[key], dirs[key])
    return dirs


def config_text(name: str, refs: dict[str, str]) -> str:
    text = (CONFIGS / f"{name}.yml").read_text()
    for placeholder, ref in sorted(refs.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(placeholder, ref)
    return text


def run_mergekit(text: str, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(out),
              options=MergeOptions(lazy_unpickle=False, copy_tokenizer=False, quiet=True, device="cpu"))
    return load_file(out / "model.safetensors")


@pytest.mark.peers
@pytest.mark.parametrize("name", ["linear", "ties", "slerp", "task_arithmetic"])
def test_configs_merge_as_mergekit_does(name, gateway, mk_dirs, tmp_path):
    pytest.importorskip("mergekit.merge")
    ours_refs = {**IDS, "EXPERT_A": str(mk_dirs["EXPERT_A"])}  # a server path: imported as expert 'expert_a'
    with gateway.admin() as c:
        r = c.post("/admin/merges", params={"background": "false"},
                   json={"id": f"mk-{name}", "mergekit_config": config_text(name, ours_refs)})
        assert r.status_code == 201, r.text
        lineage = r.json()["lineage"]
        assert "expert_a" in [p["id"] for p in lineage["parents"]] + [lineage["base"]]
        imported = c.get("/admin/experts/expert_a").json()
        assert imported["lineage"] == {"op": "import", "path": str(mk_dirs["EXPERT_A"])}
        path = gateway.data_dir / r.json()["path"] / "model.safetensors"
    ours = load_file(path)
    theirs = run_mergekit(config_text(name, {k: str(v) for k, v in mk_dirs.items()}), tmp_path / "mk")
    common = sorted(set(ours) & set(theirs))
    assert len(common) >= len(theirs) - 1 and len(common) > 10
    for k in common:
        if ours[k].is_floating_point():
            torch.testing.assert_close(ours[k], theirs[k], atol=1e-5, rtol=0, msg=f"{name}: {k}")


def test_a_config_as_a_json_object_and_its_preview(gateway, mk_dirs):
    cfg = {"merge_method": "ties", "base_model": "mk-base",
           "models": [{"model": "mk-b", "parameters": {"weight": 1.0, "density": [1, 0.2]}},
                      {"model": "mk-c", "parameters": {"weight": 0.5, "density": 0.5}}]}
    with gateway.admin() as c:
        r = c.post("/admin/merges/preview", json={"mergekit_config": cfg})
        assert r.status_code == 200, r.text
        assert r.json()["experts"] == ["mk-base", "mk-b", "mk-c"]
        assert r.json()["recipe"]["experts"][0]["per_tensor"] == {"density": [1.0, 0.2]}


@pytest.mark.parametrize("change,field", [
    ({"slices": [{"sources": [{"model": "mk-b", "layer_range": [0, 2]}]}]}, "slices"),
    ({"merge_method": "passthrough"}, "merge_method"),
    ({"tokenizer_source": "union"}, "tokenizer_source"),
    ({"models": [{"model": "mk-b", "parameters": {"weight": 1, "epsilon": 0.1}}]}, "models[0].parameters.epsilon"),
    ({"models": [{"model": "no-such-expert"}]}, "models[0].model"),
    ({"models": [{"model": "mk-b", "parameters": {"weight": [{"filter": "mlp"}]}}]}, "models[0].parameters.weight"),
    ({"dtype": "int8"}, "dtype"),
])
def test_unsupported_fields_are_a_400_naming_them(change, field, gateway, mk_dirs):
    cfg = {"merge_method": "linear", "models": [{"model": "mk-b"}, {"model": "mk-c"}], **change}
    if "slices" in change:
        cfg.pop("models")
    with gateway.admin() as c:
        r = c.post("/admin/merges", json={"id": "mk-refused", "mergekit_config": yaml.safe_dump(cfg)})
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"], r.json()
        assert c.get("/admin/experts/mk-refused").status_code == 404


def test_recipe_and_config_together_or_bad_yaml_are_refused(gateway, mk_dirs):
    with gateway.admin() as c:
        r = c.post("/admin/merges", json={"id": "x1", "mergekit_config": "models: [", "recipe": None})
        assert r.status_code == 400 and "not valid YAML" in r.json()["error"]["message"]
        r = c.post("/admin/merges", json={"id": "x1", "mergekit_config": "a: 1", "recipe": {"method": "linear"}})
        assert r.status_code == 400 and "either 'recipe' or 'mergekit_config'" in r.json()["error"]["message"]
