"""The batching engine: requests that share a batch get exactly what they get alone."""

from __future__ import annotations

import asyncio
import random

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from experts.base import GenerationParams, StreamEnd
from experts.btm.mixture import EnsembleLM
from experts.errors import EngineOverloadedError, ExpertUnavailableError
from experts.hf.engine import sync
from experts.hf.engine.choices import Request
from experts.hf.engine.engine import Engine, Prompt
from experts.hf.engine.scheduler import Limits, ModelScheduler
from experts.hf.generation import start_ids

WORDS = "the quick brown fox jumps over lazy dog def class import return while for".split()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(cfg).eval()


def random_requests(seed: int, count: int) -> list[tuple[str, GenerationParams]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 28)))
        out.append((prompt, GenerationParams(
            max_tokens=rng.randint(0, 24), temperature=rng.choice([0.0, 0.8]), top_p=rng.choice([1.0, 0.9]),
            n=rng.choice([1, 1, 2, 3]), seed=i, logprobs=rng.choice([None, 0, 2]), echo=rng.random() < 0.3,
            stop=rng.choice([(), ("e",), ("the", "x")]))))
    return out


def run_batched(model, tok, reqs, limits: Limits, every: int = 2) -> list[list]:
    """Requests join a running scheduler one every `every` steps (mid-flight)."""
    sched = ModelScheduler(model, tok, limits)
    outs: list[list] = [[] for _ in reqs]
    pending = list(range(len(reqs)))
    step = 0
    while pending or sched.has_work():
        if pending and step % every == 0:
            i = pending.pop(0)
            prompt, params = reqs[i]
            r = Request(params, tok, outs[i].extend)
            ids, n_prompt = start_ids(tok, prompt)
            r.add_prompt(prompt, ids, n_prompt)
            sched.add(r)
        sched.step()
        step += 1
    return outs


def assert_same(alone, events, params):
    assert not [e for e in events if isinstance(e, BaseException)]
    got = sync.collect(iter(events), params)
    assert (got.prompt_tokens, got.completion_tokens) == (alone.prompt_tokens, alone.completion_tokens)
    for a, b in zip(alone.choices, got.choices, strict=True):
        assert (a.text, a.finish_reason) == (b.text, b.finish_reason)
        ta, tb = (a.prompt_tokens or []) + (a.tokens or []), (b.prompt_tokens or []) + (b.tokens or [])
        assert [(t.token, t.text_offset) for t in ta] == [(t.token, t.text_offset) for t in tb]
        for x, y in zip(ta, tb, strict=True):
            assert (x.logprob is None) == (y.logprob is None)
            if x.logprob is not None:
                assert abs(x.logprob - y.logprob) < 1e-4
                assert [s for s, _ in x.top] == [s for s, _ in y.top]


@pytest.mark.parametrize("limits", [Limits(max_batch_size=8, max_batched_tokens=20),  # chunked prefill
                                    Limits(max_batch_size=3, max_batched_tokens=1024)])  # a queue forms
def test_batched_equals_alone(model, tokenizer, limits):
    reqs = random_requests(0, 14)
    alone = [sync.generate(model, tokenizer, p, params) for p, params in reqs]
    outs = run_batched(model, tokenizer, reqs, limits)
    for a, events, (_, params) in zip(alone, outs, reqs, strict=True):
        assert_same(a, events, params)


def test_the_gpt2_kernel_answers_as_the_module_does(model, tokenizer):
    """Plain GPT-2s run on the engine's own kernel; the Hugging Face module's forward gives the same answers."""
    reqs = random_requests(3, 10)
    kernel = run_batched(model, tokenizer, reqs, Limits(max_batch_size=6, max_batched_tokens=24))
    module = run_batched(model, tokenizer, reqs, Limits(max_batch_size=6, max_batched_tokens=24, gpt2_kernel=False))
    sched = ModelScheduler(model, tokenizer)
    assert sched.adapter.kernel is not None
    shared = sched.adapter.kernel.layers[0]["qkv_w"].data_ptr() == model.transformer.h[0].attn.c_attn.weight.data_ptr()
    assert shared and sched.adapter.kernel.wte.data_ptr() == model.transformer.wte.weight.data_ptr()  # no copy
    assert ModelScheduler(model, tokenizer, Limits(gpt2_kernel=False)).adapter.kernel is None
    for (_, params), a, b in zip(reqs, module, kernel, strict=True):
        assert_same(sync.collect(iter(a), params), b, params)


def test_rows_that_leave_as_holes_change_no_answer(model, tokenizer):
    """Finished rows stay in the batch as holes (no cache copy) while they are few; the others' answers are
    those they get alone, and a hole never walks past the context (the row that fills it finishes first)."""
    rng = random.Random(5)
    words = " ".join(rng.choice(WORDS) for _ in range(200))
    long = tokenizer.decode(start_ids(tokenizer, words)[0][:120])
    n_long = len(start_ids(tokenizer, long)[0])
    assert 2 <= 128 - n_long <= 8
    reqs = [(long, GenerationParams(max_tokens=128 - n_long, temperature=0.0))]  # ends exactly at the context
    reqs += [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
              GenerationParams(max_tokens=12 + 2 * i, temperature=0.8 if i % 2 else 0.0, seed=i, logprobs=1))
             for i in range(11)]
    alone = [sync.generate(model, tokenizer, p, params) for p, params in reqs]
    sched = ModelScheduler(model, tokenizer, Limits(max_batch_size=16, max_batched_tokens=4096))
    outs: list[list] = [[] for _ in reqs]
    for (prompt, params), out in zip(reqs, outs, strict=True):  # all at once: no join compacts the holes
        r = Request(params, tokenizer, out.extend)
        r.add_prompt(prompt, *start_ids(tokenizer, prompt))
        sched.add(r)
    holes = []
    while sched.has_work():
        sched.step()
        holes.append(sched.running.holes if sched.running else 0)
    for a, events, (_, params) in zip(alone, outs, reqs, strict=True):
        assert_same(a, events, params)
    assert max(holes) == 12 // 4  # rows did leave as holes, at most a quarter of the batch


@pytest.mark.parametrize("backend,mode", [("stacked", "paper"), ("stacked", "reference"), ("loop", "paper")])
def test_forest_batched_equals_alone(tokenizer, backend, mode):
    experts = []
    for s in range(3):
        torch.manual_seed(10 + s)
        experts.append(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer),
                                                  n_positions=128)).eval())
    forest = EnsembleLM(experts, [0.5, 0.3, 0.2], mode=mode, backend=backend).eval()
    assert forest.runner.name == backend
    reqs = random_requests(1, 8)
    alone = [sync.generate(forest, tokenizer, p, params) for p, params in reqs]
    outs = run_batched(forest, tokenizer, reqs, Limits(max_batch_size=6, max_batched_tokens=16))
    for a, events, (_, params) in zip(alone, outs, reqs, strict=True):
        assert_same(a, events, params)


def _forest(tokenizer, backend: str) -> EnsembleLM:
    experts = []
    for s in range(3):
        torch.manual_seed(10 + s)
        experts.append(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer),
                                                  n_positions=128)).eval())
    return EnsembleLM(experts, [0.5, 0.3, 0.2], mode="paper", backend=backend).eval()


@pytest.mark.parametrize("kind", ["model", "stacked", "loop"])
def test_joining_rows_fill_holes_and_change_no_answer(model, tokenizer, kind, monkeypatch):
    """A row that joins while others have left takes a hole's place (its cache written over that row, the
    others not copied); every answer stays the one it gets alone."""
    lm = model if kind == "model" else _forest(tokenizer, kind)
    rng = random.Random(7)
    reqs = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6 if i < 4 else 3))),
             GenerationParams(max_tokens=[2, 14, 16, 18][i] if i < 4 else 6, temperature=0.8 if i % 2 else 0.0,
                              seed=i, logprobs=1))
            for i in range(7)]
    alone = [sync.generate(lm, tokenizer, p, params) for p, params in reqs]
    sched = ModelScheduler(lm, tokenizer, Limits(max_batch_size=4, max_batched_tokens=4096))
    placed: list[int] = []
    place = sched.adapter.place
    monkeypatch.setattr(sched.adapter, "place", lambda c, slots, new, pad: (placed.append(len(slots)),
                                                                            place(c, slots, new, pad))[1])
    outs: list[list] = [[] for _ in reqs]
    for i, ((prompt, params), out) in enumerate(zip(reqs, outs, strict=True)):
        r = Request(params, tokenizer, out.extend)
        r.add_prompt(prompt, *start_ids(tokenizer, prompt))
        sched.add(r)
        if i == 3:  # the first four fill the batch before the others arrive
            for _ in range(3):
                sched.step()
    while sched.has_work():
        sched.step()
    for a, events, (_, params) in zip(alone, outs, reqs, strict=True):
        assert_same(a, events, params)
    assert placed, "no row joined into a hole"


def test_a_prompt_is_prefilled_once_for_its_n_choices(model, tokenizer):
    sched = ModelScheduler(model, tokenizer)
    out: list = []
    r = Request(GenerationParams(max_tokens=3, n=4, temperature=1.0, seed=1), tokenizer, out.extend)
    ids, n_prompt = start_ids(tokenizer, "one two three four five")
    r.add_prompt("x", ids, n_prompt)
    sched.add(r)
    first = sched.step()
    assert first.prefill_tokens == len(ids)  # once, not 4 times
    assert sched.rows == 4


def test_cancel_frees_the_rows_at_the_next_step(model, tokenizer):
    sched = ModelScheduler(model, tokenizer)
    out_a: list = []
    out_b: list = []
    a = Request(GenerationParams(max_tokens=100, temperature=0.0), tokenizer, out_a.extend)
    b = Request(GenerationParams(max_tokens=5, temperature=0.0), tokenizer, out_b.extend)
    for r in (a, b):
        ids, n_prompt = start_ids(tokenizer, "hello there")
        r.add_prompt("hello there", ids, n_prompt)
        sched.add(r)
    sched.step()
    assert sched.rows == 2
    a.cancel()
    sent = len(out_a)
    sched.step()
    assert sched.rows == 1 and len(out_a) == sent  # gone, and nothing more is sent to it
    while sched.has_work():
        sched.step()
    assert isinstance(out_b[-1], StreamEnd)


def test_a_full_queue_refuses(model, tokenizer):
    sched = ModelScheduler(model, tokenizer, Limits(max_queue=2))
    for _ in range(2):
        r = Request(GenerationParams(max_tokens=1), tokenizer, lambda ev: None)
        r.add_prompt("a", [1], 1)
        sched.add(r)
    r = Request(GenerationParams(max_tokens=1), tokenizer, lambda ev: None)
    r.add_prompt("a", [1], 1)
    with pytest.raises(EngineOverloadedError):
        sched.add(r)


class NanOnToken(torch.nn.Module):
    """A model that answers NaN logits for the rows whose current input token is `bad`."""

    def __init__(self, inner, bad: int) -> None:
        super().__init__()
        self.inner, self.bad, self.config = inner, bad, inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, cache=None,
                logits_to_keep=0, **kw):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=use_cache, cache=cache, logits_to_keep=logits_to_keep, **kw)
        hit = (input_ids[:, -1] == self.bad)
        out.logits[hit] = float("nan")
        return out


def test_a_failing_sequence_fails_only_its_request(model, tokenizer):
    good_ids, _ = start_ids(tokenizer, "a good prompt")
    bad = good_ids[-1] + 1
    wrapped = NanOnToken(model, bad)
    sched = ModelScheduler(wrapped, tokenizer)
    params = GenerationParams(max_tokens=6, temperature=0.0)
    outs: list[list] = [[], []]
    for out, ids in zip(outs, (good_ids, good_ids[:-1] + [bad]), strict=True):
        r = Request(params, tokenizer, out.extend)
        r.add_prompt("p", ids, len(ids))
        sched.add(r)
    while sched.has_work():
        sched.step()
    assert isinstance(outs[1][-1], ExpertUnavailableError) and "non-finite" in str(outs[1][-1])
    assert_same(sync.generate(model, tokenizer, "a good prompt", params), outs[0], params)


def test_engine_streams_concurrent_requests_and_runs_work_between_steps(model, tokenizer):
    engine = Engine(Limits(max_batch_size=4))
    try:
        async def main():
            params = GenerationParams(max_tokens=8, temperature=0.0)
            prompts = ["alpha beta", "gamma", "delta epsilon zeta"]

            async def one(text):
                ids, n = start_ids(tokenizer, text)
                stream = engine.stream("m", model, tokenizer, [Prompt(text, ids, n)], params)
                return [ev async for ev in stream]

            results = await asyncio.gather(*(one(p) for p in prompts))
            assert await engine.run(lambda x: x + 1, 41) == 42
            return results

        results = asyncio.run(main())
        for text, events in zip(["alpha beta", "gamma", "delta epsilon zeta"], results, strict=True):
            assert_same(sync.generate(model, tokenizer, text, GenerationParams(max_tokens=8, temperature=0.0)),
                        events, GenerationParams(max_tokens=8, temperature=0.0))
    finally:
        engine.close()
