"""Many adapters on one resident base: per-row LoRA deltas equal the merged weights, in any batch."""

from __future__ import annotations

import pytest
import torch

from experts.base import GenerationParams
from experts.hf.engine import sync
from experts.hf.engine.choices import Request
from experts.hf.engine.scheduler import Limits, ModelScheduler
from experts.hf.generation import score_ids, start_ids
from experts.hf.loading import load_hf_model
from experts.hf.lora import load_lora_model
from experts.hf.multilora import AdapterCache, MultiLora, evo_factors, read_adapter
from merging.lora import evo_lora
from tests.helpers import build_adapter_dir, wait_until

PARAMS = GenerationParams(max_tokens=12, temperature=0.0, logprobs=2)


@pytest.fixture(scope="module")
def pool(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("ml")
    dirs = [build_adapter_dir(root / f"a{i}", tiny_model_dir, rank=2 + 2 * i, seed=i,
                              targets=("c_attn", "c_proj", "c_fc")) for i in range(3)]
    return dirs, [read_adapter(f"a{i}", d) for i, d in enumerate(dirs)]


def test_per_row_deltas_equal_the_merged_adapter(tiny_model_dir, pool):
    dirs, factors = pool
    base = load_hf_model(tiny_model_dir)
    for d, f in zip(dirs, factors, strict=True):
        merged = load_lora_model(d, tiny_model_dir)
        want = sync.generate(merged.model, merged.tokenizer, "def f(x):", PARAMS)
        got = sync.generate(base.model, base.tokenizer, "def f(x):", PARAMS, adapter=f)
        assert got.choices[0].text == want.choices[0].text
        for a, b in zip(want.choices[0].tokens, got.choices[0].tokens, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4
    # and the base's own answer is untouched by the hooks
    plain = sync.generate(base.model, base.tokenizer, "def f(x):", PARAMS)
    assert plain.choices[0].text == sync.generate(load_hf_model(tiny_model_dir).model, base.tokenizer,
                                                  "def f(x):", PARAMS).choices[0].text


def test_a_batch_of_mixed_adapters_and_the_bare_base_equals_each_alone(tiny_model_dir, pool):
    _, factors = pool
    base = load_hf_model(tiny_model_dir)
    rows = [None, factors[0], factors[1], factors[2], factors[0], None, factors[2]]
    sched = ModelScheduler(base.model, base.tokenizer, Limits(max_batch_size=8, max_batched_tokens=24))
    outs: list[list] = []
    for k, ad in enumerate(rows):
        out: list = []
        outs.append(out)
        r = Request(PARAMS, base.tokenizer, out.extend, ad)
        ids, n = start_ids(base.tokenizer, "def f(x):" + " y" * k)
        r.add_prompt("p", ids, n)
        sched.add(r)
        sched.step()  # they join mid-flight
    while sched.has_work():
        sched.step()
    for k, ad in enumerate(rows):
        alone = sync.generate(base.model, base.tokenizer, "def f(x):" + " y" * k, PARAMS, adapter=ad)
        got = sync.collect(iter(outs[k]), PARAMS)
        assert got.choices[0].text == alone.choices[0].text


def test_evo_factors_are_the_evo_operator_and_score_like_merged_weights(tiny_model_dir, pool):
    _, factors = pool
    same_rank = [factors[0], read_adapter("b", pool[0][0])]  # evo needs one rank
    f = evo_factors("evo", same_rank, [0.5, 1.0], [0.8, -0.3])
    path = next(iter(f.modules))
    a, b = evo_lora([x.modules[path][0] for x in same_rank], [x.modules[path][1] for x in same_rank],
                    [0.5, 1.0], [0.8, -0.3])
    assert torch.equal(f.modules[path][0], a) and torch.equal(f.modules[path][1], b)
    base = load_hf_model(tiny_model_dir)
    ids, _ = start_ids(base.tokenizer, "import os\nprint(os.getcwd())")
    with MultiLora.of(base.model).applied([f]):
        scored = score_ids(base.model, base.tokenizer, ids)
    plain = score_ids(base.model, base.tokenizer, ids)
    assert any(abs(x.logprob - y.logprob) > 1e-3 for x, y in zip(scored[1:], plain[1:], strict=True))


def test_adapter_cache_is_bounded_by_bytes(pool):
    _, factors = pool
    cache = AdapterCache(max_bytes=factors[0].nbytes + factors[1].nbytes)
    for f in factors:
        cache.get(f.key, lambda f=f: f)
    stats = cache.stats()
    assert stats["bytes"] <= factors[0].nbytes + factors[1].nbytes + factors[2].nbytes
    assert stats["adapters"] < 3 and stats["misses"] == 3
    cache.get(factors[2].key, lambda: pytest.fail("the newest entry is kept"))
    assert cache.stats()["hits"] == 1
    cache.forget(factors[2].key)
    assert cache.stats()["adapters"] == stats["adapters"] - 1


def test_segments_equal_per_row_adapters(tiny_model_dir, pool):
    """`segments` (one stacked entry per run of `group` rows, as merge sessions lay out candidates x examples)
    gives each row what `applied` gives it with the adapter named per row."""
    _, factors = pool
    base = load_hf_model(tiny_model_dir)
    model = base.model
    ids, _ = start_ids(base.tokenizer, "import os\nprint(os.getcwd())")
    x = torch.tensor([ids, ids[::-1]])  # 2 rows per entry
    rows = [factors[0], factors[0], factors[2], factors[2]]
    with torch.inference_mode():
        with MultiLora.of(model).applied(rows):
            want = model(input_ids=x.repeat(2, 1)).logits
        stacks = {}
        for path in factors[0].modules:
            entries = [f.modules[path] for f in (factors[0], factors[2])]
            rank = max(a.shape[0] for a, _, _ in entries)
            at = torch.zeros(2, entries[0][0].shape[1], rank)
            bt = torch.zeros(2, rank, entries[0][1].shape[0])
            for k, (a, b, s) in enumerate(entries):
                at[k, :, :a.shape[0]] = a.t()
                bt[k, :b.shape[1]] = (s * b).t()
            stacks[path] = (at, bt)
        with MultiLora.of(model).segments(stacks, group=2):
            got = model(input_ids=x.repeat(2, 1)).logits
        plain = model(input_ids=x.repeat(2, 1)).logits  # unbound again: the bare base
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got[:2], got[2:], atol=1e-3) and not torch.allclose(plain, got, atol=1e-3)


def test_lora_rows_run_on_the_gpt2_kernel(tiny_model_dir, pool, monkeypatch):
    """Adapters on the kernel's projections are served by the engine's GPT-2 kernel (the module's forward is not
    called), with the same answer as the module's forward with its hooks."""
    _, factors = pool
    base = load_hf_model(tiny_model_dir)
    module = sync.generate(base.model, base.tokenizer, "def f(x):", PARAMS, adapter=factors[1],
                           limits=Limits(gpt2_kernel=False))
    calls: list[str] = []
    delta = MultiLora.delta
    monkeypatch.setattr(MultiLora, "delta",
                        lambda self, path, x, out: (calls.append(path), delta(self, path, x, out))[1])
    monkeypatch.setattr(type(base.model), "forward", lambda *a, **k: (_ for _ in ()).throw(AssertionError("module")))
    kernel = sync.generate(base.model, base.tokenizer, "def f(x):", PARAMS, adapter=factors[1])
    assert calls and all(p.startswith("transformer.h.") for p in calls)
    assert kernel.choices[0].text == module.choices[0].text
    for a, b in zip(module.choices[0].tokens, kernel.choices[0].tokens, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-4


def test_an_idle_engine_drops_the_lora_rows_stacks_and_trims(tiny_model_dir, pool):
    import asyncio

    from experts.base import StreamDelta
    from experts.hf.engine.engine import Engine, Prompt

    _, factors = pool
    base = load_hf_model(tiny_model_dir)
    want = [sync.generate(base.model, base.tokenizer, f"def f{i}(x):", PARAMS, adapter=f).choices[0].text
            for i, f in enumerate(factors)]
    assert len(set(want)) == len(want)  # each adapter answers its own way
    engine = Engine(Limits(max_batch_size=4))
    if not engine.heap.available:
        engine.close()
        pytest.skip("no malloc_trim in this C library: the engine has nothing to wake up for")
    engine.heap.after_idle_s = 0.05

    async def burst() -> list[str]:
        async def one(i: int, f) -> str:
            ids, n = start_ids(base.tokenizer, f"def f{i}(x):")
            events = [e async for e in engine.stream("m", base.model, base.tokenizer, [Prompt("p", ids, n)],
                                                     PARAMS, adapter=f)]
            return "".join(e.text for e in events if isinstance(e, StreamDelta))
        return list(await asyncio.gather(*(one(i, f) for i, f in enumerate(factors))))

    try:
        for round_ in range(2):  # the second burst runs on a released binding and a trimmed heap
            got = asyncio.run(burst())
            assert got == want
            assert wait_until(lambda r=round_: engine.heap.trims > r)
            assert engine.heap.trims == round_ + 1
            assert base.model._mergegate_multilora._last is None  # the per-row stacks went with the idle model
    finally:
        engine.close()
