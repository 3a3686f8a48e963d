"""merging/apply.py over real safetensors checkpoints of a tiny GPT-2 written by the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2LMHeadModel

from merging.apply import check_compatible, check_tokenizers, estimate, merge_tensors, tensor_seed
from merging.errors import IncompatibleExpertsError
from merging.methods import merge_tensor
from merging.recipe import MergeRecipe
from merging.sources import DictSource, SafetensorsSource


def sources(dirs: dict[str, Path], *names: str) -> dict[str, SafetensorsSource]:
    return {n: SafetensorsSource(dirs[n]) for n in names}


def state(src: SafetensorsSource) -> dict[str, torch.Tensor]:
    return {k: src.get(k) for k in src.keys()}  # noqa: SIM118 (a TensorSource, not a dict)


class CountingSource(DictSource):
    """Records every get() so tests can see how many tensors a merge holds."""

    def __init__(self, tensors: dict[str, torch.Tensor], log: list[str]) -> None:
        super().__init__(tensors)
        self.log = log

    def get(self, name: str) -> torch.Tensor:
        self.log.append(name)
        return super().get(name)


def test_safetensors_source_is_lazy_and_typed(gpt2_dirs: dict[str, Path]) -> None:
    src = SafetensorsSource(gpt2_dirs["base"])
    assert "lm_head.weight" not in src.keys()  # noqa: SIM118 (a TensorSource, not a dict); tied: not stored
    assert (
        src.shape("transformer.wte.weight") == (64, 32)
        and src.dtype("transformer.wte.weight") == torch.float32
    )
    assert src.get("transformer.wte.weight").shape == (64, 32)
    assert src.lora_scaling is None


@pytest.mark.parametrize(
    ("method", "per", "params"),
    [
        ("linear", [{"weight": 1.0}, {"weight": 2.0}, {"weight": 1.0}], {}),
        ("task_arithmetic", [{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.2}], {}),
        ("ties", [{"density": 0.2}, {"density": 0.5}, {"density": 0.9}], {}),
        ("breadcrumbs", [{"density": 0.5, "gamma": 0.05}] * 3, {}),
        ("dare_ties", [{"density": 0.5}] * 3, {}),
        ("evo", [{"alpha": 0.3, "beta": 0.5}, {"alpha": 0.9, "beta": -0.2}, {"alpha": 1.0, "beta": 0.4}], {}),
    ],
)
def test_merge_tensors_over_files_equals_per_tensor_merge(
    gpt2_dirs: dict[str, Path], method: str, per: list[dict[str, float]], params: dict[str, Any]
) -> None:
    srcs = sources(gpt2_dirs, "base", "e1", "e2", "e3")
    base = None if method == "linear" else "base"
    recipe = MergeRecipe(
        method=method,
        base=base,
        experts=[{"id": f"e{i + 1}", **p} for i, p in enumerate(per)],
        parameters=params,
        seed=5,
    )
    progress: list[tuple[int, int, str]] = []
    out = dict(merge_tensors(recipe, srcs, lambda i, n, name: progress.append((i, n, name))))
    keys = srcs["base"].keys()
    assert (
        list(out) == keys
        and [p[2] for p in progress] == keys
        and progress[-1][:2] == (len(keys) - 1, len(keys))
    )
    for k in keys:
        gen = torch.Generator().manual_seed(tensor_seed(5, k))
        ref = merge_tensor(
            method,
            srcs["base"].get(k) if base else None,
            [srcs[f"e{i}"].get(k) for i in (1, 2, 3)],
            per,
            params,
            gen,
        )
        assert torch.equal(out[k], ref), k


def test_merged_checkpoint_loads_with_tied_head(gpt2_dirs: dict[str, Path], tmp_path: Path) -> None:
    recipe = MergeRecipe(method="linear", experts=[{"id": "e1"}, {"id": "e2"}], dtype="bfloat16")
    out = dict(merge_tensors(recipe, sources(gpt2_dirs, "e1", "e2")))
    assert "lm_head.weight" not in out and all(t.dtype == torch.bfloat16 for t in out.values())
    model = GPT2LMHeadModel.from_pretrained(gpt2_dirs["e1"])
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in out.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_lm_head_present_everywhere_is_merged() -> None:
    g = torch.Generator().manual_seed(0)
    sds = [
        {"w": torch.randn(3, 2, generator=g), "lm_head.weight": torch.randn(4, 2, generator=g)}
        for _ in range(2)
    ]
    recipe = MergeRecipe(method="linear", experts=[{"id": "a"}, {"id": "b"}])
    out = dict(merge_tensors(recipe, {"a": DictSource(sds[0]), "b": DictSource(sds[1])}))
    assert torch.allclose(out["lm_head.weight"], (sds[0]["lm_head.weight"] + sds[1]["lm_head.weight"]) / 2)
    del sds[1]["lm_head.weight"]
    with pytest.raises(IncompatibleExpertsError, match="lm_head.weight"):
        merge_tensors(recipe, {"a": DictSource(sds[0]), "b": DictSource(sds[1])})


def test_non_float_tensors_copied_from_base(tmp_path: Path) -> None:
    for i, name in enumerate(("base", "x")):
        (tmp_path / name).mkdir()
        save_file(
            {"w": torch.full((2, 2), float(i)), "steps": torch.tensor([7 + i], dtype=torch.int64)},
            str(tmp_path / name / "model.safetensors"),
        )
    srcs = {n: SafetensorsSource(tmp_path / n) for n in ("base", "x")}
    recipe = MergeRecipe(method="task_arithmetic", base="base", experts=[{"id": "x", "weight": 0.5}])
    out = dict(merge_tensors(recipe, srcs))
    assert out["steps"].tolist() == [7] and out["steps"].dtype == torch.int64
    assert out["w"].tolist() == [[0.5, 0.5], [0.5, 0.5]]


def test_one_tensor_position_at_a_time() -> None:
    log: list[str] = []
    sds = [{f"t{j}": torch.full((4,), float(i + j)) for j in range(5)} for i in range(3)]
    srcs = {n: CountingSource(sd, log) for n, sd in zip(("base", "a", "b"), sds, strict=True)}
    recipe = MergeRecipe(method="task_arithmetic", base="base", experts=[{"id": "a"}, {"id": "b"}])
    it = merge_tensors(recipe, srcs)
    assert log == []  # checks ran from shapes, no tensor read yet
    name, _ = next(it)
    assert name == "t0" and log == ["t0"] * 3  # only the first position's inputs were read


def test_incompatible_shapes_and_keys_refused(gpt2_dirs: dict[str, Path]) -> None:
    srcs = sources(gpt2_dirs, "base", "e1", "wide")
    with pytest.raises(
        IncompatibleExpertsError,
        match=r"tensor 'transformer.h.0.attn.c_attn.bias' has shape \[144\] in 'wide' but \[96\] in 'base'",
    ):
        check_compatible(srcs, "base")
    recipe = MergeRecipe(method="ties", base="base", experts=[{"id": "e1"}, {"id": "wide"}])
    with pytest.raises(IncompatibleExpertsError, match="wide"):
        merge_tensors(recipe, srcs)  # refused before any work
    a = DictSource({"x": torch.zeros(2), "y": torch.zeros(2)})
    b = DictSource({"x": torch.zeros(2), "z": torch.zeros(2)})
    with pytest.raises(IncompatibleExpertsError, match=r"missing in 'b': 'y'.*not in 'a': 'z'"):
        check_compatible({"a": a, "b": b})
    with pytest.raises(IncompatibleExpertsError, match="no tensors for expert"):
        merge_tensors(recipe, {"base": srcs["base"], "e1": srcs["e1"]})


def test_tokenizer_check() -> None:
    check_tokenizers({"a": "abc", "b": "abc", "c": None})
    with pytest.raises(IncompatibleExpertsError, match="tokenizers differ"):
        check_tokenizers({"a": "abc", "b": "xyz"})
    check_tokenizers({"a": "abc", "b": "xyz"}, allow_mismatch=True)


def test_estimate(gpt2_dirs: dict[str, Path]) -> None:
    srcs = sources(gpt2_dirs, "base", "e1", "e2")
    recipe = MergeRecipe(method="ties", base="base", experts=[{"id": "e1"}, {"id": "e2"}])
    est = estimate(recipe, srcs)
    base_keys = srcs["base"].keys()  # a list (a TensorSource is not a dict)
    numel = sum(torch.Size(srcs["base"].shape(k)).numel() for k in base_keys)
    assert est["num_tensors"] == 28 and est["output_bytes"] == 4 * numel
    biggest = max(torch.Size(srcs["base"].shape(k)).numel() for k in base_keys)
    assert est["peak_bytes"] == biggest * 4 * (3 + 2 * 3 + 1)  # stored + 2 float32 copies each + output
    half = MergeRecipe(method="ties", base="base", experts=[{"id": "e1"}, {"id": "e2"}], dtype="float16")
    assert estimate(half, srcs)["output_bytes"] == 2 * numel


def test_dare_seed_reproducible_and_order_independent(gpt2_dirs: dict[str, Path]) -> None:
    srcs = sources(gpt2_dirs, "base", "e1", "e2")

    def run(seed: int) -> dict[str, torch.Tensor]:
        r = MergeRecipe(
            method="dare_linear",
            base="base",
            seed=seed,
            experts=[{"id": "e1", "density": 0.3}, {"id": "e2", "density": 0.6}],
        )
        return dict(merge_tensors(r, srcs))

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert tensor_seed(1, "x") != tensor_seed(1, "y") and tensor_seed(1, "x") == tensor_seed(1, "x")


def test_sharded_directory_and_duplicates(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3, dtype=torch.bfloat16)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    src = SafetensorsSource(tmp_path)
    assert src.keys() == ["a", "b"] and src.dtype("b") == torch.bfloat16 and src.get("b").shape == (3,)
    save_file({"a": torch.ones(2)}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(IncompatibleExpertsError, match="'a' appears in both"):
        SafetensorsSource(tmp_path)
    with pytest.raises(IncompatibleExpertsError, match="no \\*.safetensors"):
        SafetensorsSource(tmp_path / "missing")


def test_merging_imports_only_allowed_packages() -> None:
    """merging/ imports neither app nor experts: only torch, safetensors, pydantic, numpy, nevergrad."""
    import ast
    import sys

    allowed = {"torch", "safetensors", "pydantic", "numpy", "nevergrad", "merging"} | set(
        sys.stdlib_module_names
    )
    root = Path(__file__).resolve().parents[2] / "merging"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
