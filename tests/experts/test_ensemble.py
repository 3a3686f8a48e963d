"""BTM ensemble inference: hand-computed posteriors/mixtures (spec shared/specs/btm.md §6) on toy
experts with known next-token tables, and EnsembleLM on tiny real GPT-2s through experts.hf.generation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from experts.base import GenerationParams
from experts.btm.mixture import (
    EnsembleLM,
    bayes_posterior,
    cached_prior,
    estimate_prior,
    mix_log_weights,
    mix_log_weights_outer,
    mix_logprobs,
    reference_posterior,
    sequence_posteriors,
    top_k_experts,
)
from experts.hf import generation
from experts.hf.engine import sync


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster, and steadier on a shared CPU (restored afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# toy experts: the next-token distribution depends only on the previous token


def table(next_probs: dict[int, float], vocab: int = 4) -> torch.Tensor:
    """Row r: probability next_probs[r] on token r+1, the rest spread evenly; unlisted rows uniform."""
    t = torch.full((vocab, vocab), 1.0 / vocab, dtype=torch.float64)
    for r, p in next_probs.items():
        t[r] = (1.0 - p) / (vocab - 1)
        t[r, r + 1] = p
    return t


class TableLM(torch.nn.Module):
    """An HF-like causal LM whose logits are log(table[previous token]); the 'cache' counts tokens."""

    def __init__(self, probs: torch.Tensor, n_positions: int = 32) -> None:
        super().__init__()
        self.register_buffer("logp", probs.log().float())
        self.config = SimpleNamespace(n_positions=n_positions, vocab_size=probs.shape[0], bos_token_id=0,
                                      eos_token_id=0)
        self.calls = 0

    def forward(self, input_ids, use_cache=True, cache=None, **kw):
        self.calls += 1
        return SimpleNamespace(logits=self.logp[input_ids], cache=(cache or 0) + input_ids.shape[1])


# Observed-token probabilities of the sequence 0 1 2 3 (spec §6: P = [[.5, .2, .4], [.1, .6, .3]])
A = table({0: 0.5, 1: 0.2, 2: 0.4})
B = table({0: 0.1, 1: 0.6, 2: 0.3})
C = table({0: 0.9, 1: 0.9, 2: 0.9})
SEQ = [0, 1, 2, 3]
P_OBS = torch.tensor([[0.5, 0.2, 0.4], [0.1, 0.6, 0.3]], dtype=torch.float64)  # [expert, t]
LOG_PRIOR = torch.log(torch.tensor([0.7, 0.3], dtype=torch.float64))

# spec §6, computed by hand
PAPER_W = [(0.7, 0.3), (0.92105, 0.07895), (0.79545, 0.20455)]
PAPER_Q = [0.38, 0.23158, 0.37955]
PAPER_PPL = 3.10516
REF_W = [(0.5, 0.5), (0.92105, 0.07895), (0.4375, 0.5625)]
REF_Q = [0.30, 0.23158, 0.34375]
REF_PPL = 3.47253


def observed(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Probabilities the model gave to ids[1:] (logits [1, T, V])."""
    return logits[0, :-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1).exp().double()


def close(got, want, tol=1e-5):
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert torch.allclose(got, want, atol=tol, rtol=0), (got, want)


@pytest.mark.parametrize("mode,w,q,ppl", [("paper", PAPER_W, PAPER_Q, PAPER_PPL),
                                          ("reference", REF_W, REF_Q, REF_PPL)])
def test_pure_sequence_posteriors_match_spec_vectors(mode, w, q, ppl):
    target = P_OBS.T.log()  # [T, k]
    weights = sequence_posteriors(LOG_PRIOR, target, mode)
    mix = mix_logprobs(target.unsqueeze(-1), weights).squeeze(-1)  # V = 1: the observed token only
    close(weights, w)
    close(mix.exp(), q)
    assert math.exp(-float(mix.mean())) == pytest.approx(ppl, abs=1e-5)


def test_pure_bayes_and_reference_posterior():
    # paper: whole context 0 1 2 -> likelihoods (.5*.2, .1*.6) x prior (.7, .3) = (.07, .018)
    close(bayes_posterior(LOG_PRIOR, torch.log(torch.tensor([0.1, 0.06], dtype=torch.float64))),
          [0.07 / 0.088, 0.018 / 0.088])
    # reference: previous token only, (.7*.2, .3*.6) = (.14, .18)
    prev = torch.log(torch.tensor([0.2, 0.6], dtype=torch.float64))
    close(reference_posterior(LOG_PRIOR, prev), [0.4375, 0.5625])
    # batched leading axes
    ll = torch.log(torch.tensor([[[0.1, 0.06]], [[1.0, 1.0]]], dtype=torch.float64))
    close(bayes_posterior(LOG_PRIOR, ll)[:, 0], [[0.07 / 0.088, 0.018 / 0.088], [0.7, 0.3]])


def test_mix_logprobs_is_stable_and_normalised():
    lp = torch.tensor([[-1000.0, -1001.0], [-1002.0, -1000.5]], dtype=torch.float64)  # [k, V]
    out = mix_logprobs(lp, torch.tensor([0.25, 0.75], dtype=torch.float64))
    want = [-1000 + math.log(0.25 + 0.75 * math.exp(-2)),
            -1000 + math.log(0.25 * math.exp(-1) + 0.75 * math.exp(-0.5))]
    close(out, want, 1e-9)
    probs = torch.tensor([[0.2, 0.8], [0.6, 0.4]])
    close(mix_logprobs(probs.log(), torch.tensor([0.5, 0.5])).exp(), [0.4, 0.6])


def test_mix_over_the_outer_axis_matches_the_hand_computed_mixture():
    # two experts (outer axis), two rows, three tokens; row 0: w = (0.25, 0.75), row 1: w = (1, 0)
    p = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], [[0.9, 0.1, 0.0], [0.4, 0.4, 0.2]]], dtype=torch.float64)
    w = torch.tensor([[0.25, 0.75], [1.0, 0.0]], dtype=torch.float64)
    out = mix_log_weights_outer(p.log(), w.log())
    close(out.exp(), [[0.8, 0.2, 0.0], [0.2, 0.3, 0.5]], 1e-12)
    assert out[0, 2] == float("-inf") and not out.isnan().any()  # a token no expert allows stays -inf
    lp = torch.log_softmax(torch.randn(4, 3, 7, dtype=torch.float64), -1)
    lw = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    close(mix_log_weights_outer(lp, lw), mix_log_weights(lp.permute(1, 0, 2), lw), 1e-12)


def test_cached_prior_ema_spec_vector():
    posts = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.7, 0.3]], dtype=torch.float64)
    close(cached_prior(posts[:1]), [0.6, 0.4])
    close(cached_prior(posts[:2]), [0.66, 0.34])  # 0.7 * 0.6 + 0.3 * 0.8
    close(cached_prior(posts), [0.672, 0.328])  # 0.7 * 0.66 + 0.3 * 0.7
    close(cached_prior(posts, decay=1.0), [0.7, 0.3])
    with pytest.raises(ValueError):
        cached_prior(posts, decay=0.0)


def test_top_k_experts_spec_vector():
    sel = top_k_experts(torch.tensor([0.5, 0.3, 0.2]), 2)
    assert sel.indices.tolist() == [0, 1]
    close(sel.prior, [0.625, 0.375, 0.0])
    sel = top_k_experts(torch.tensor([0.2, 0.5, 0.3]), 1)
    assert sel.indices.tolist() == [1]
    close(sel.prior, [0.0, 1.0, 0.0])
    assert top_k_experts(torch.tensor([0.25, 0.25, 0.5]), 2).indices.tolist() == [0, 2]  # tie: lower index
    assert top_k_experts(torch.tensor([0.5, 0.5]), None).indices.tolist() == [0, 1]
    with pytest.raises(ValueError):
        top_k_experts(torch.tensor([0.5, 0.5]), 0)


# ---------------------------------------------------------------------------------------------
# EnsembleLM on the toy experts


@pytest.mark.parametrize("mode,w,q", [("paper", PAPER_W, PAPER_Q), ("reference", REF_W, REF_Q)])
def test_ensemble_forward_matches_hand_computed(mode, w, q):
    ens = EnsembleLM([TableLM(A), TableLM(B)], [0.7, 0.3], mode=mode).eval()
    out = ens(input_ids=torch.tensor([SEQ]))
    close(observed(out.logits, SEQ), q)
    close(out.weights[0, :3], w)
    # logits are the whole mixture distribution in log space (log_softmax is a no-op)
    close(out.logits[0, 0].exp(), w[0][0] * A[0] + w[0][1] * B[0])
    close(torch.log_softmax(out.logits, -1), out.logits, 1e-6)


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_ensemble_cache_updates_posterior_token_by_token(mode):
    ens = EnsembleLM([TableLM(A), TableLM(B)], [0.7, 0.3], mode=mode)
    full = ens(input_ids=torch.tensor([SEQ])).logits
    a = ens(input_ids=torch.tensor([SEQ[:2]]))
    b = ens(input_ids=torch.tensor([SEQ[2:3]]), cache=a.cache)
    c = ens(input_ids=torch.tensor([SEQ[3:]]), cache=b.cache)
    close(torch.cat([a.logits, b.logits, c.logits], 1), full, 1e-6)
    assert c.cache.length == 4 and c.cache.experts == [4, 4]
    close(c.cache.loglik[0], P_OBS.log().sum(1), 1e-6)  # running log-likelihood of the context


def test_ensemble_top_k_runs_only_the_top_experts():
    experts = [TableLM(A), TableLM(B), TableLM(C)]
    ens = EnsembleLM(experts, [0.5, 0.3, 0.2], top_k=2)
    assert ens.selected == [0, 1] and ens.config.top_k == 2 and ens.config.num_experts == 3
    close(ens.prior, [0.625, 0.375, 0.0])
    out = ens(input_ids=torch.tensor([SEQ]))
    # q0 = .625 * .5 + .375 * .1; then w1 ∝ (.625 * .5, .375 * .1) = (.892857, .107143)
    close(observed(out.logits, SEQ)[:2], [0.35, 0.892857 * 0.2 + 0.107143 * 0.6])
    assert experts[2].calls == 0 and experts[0].calls == 1
    # k = 1: the single expert
    one = EnsembleLM(experts, [0.2, 0.5, 0.3], top_k=1)
    close(one(input_ids=torch.tensor([SEQ])).logits[0], B[SEQ].log(), 1e-6)


@pytest.mark.parametrize("mode,want", [
    # paper: seq 0 1 2 under uniform prior: (.5*.2, .1*.6) -> (.625, .375); seq 1 2 3 with that prior:
    # (.625*.2*.4, .375*.6*.3) = (.05, .0675) -> (.425532, .574468); EMA: .7*(.625,.375) + .3*that
    ("paper", [0.7 * 0.625 + 0.3 * 0.05 / 0.1175, 0.7 * 0.375 + 0.3 * 0.0675 / 0.1175]),
    # reference: weights that scored each last token: (.5, .1) -> (.8333, .1667); then
    # (.8333*.2, .1667*.6) -> (.625, .375); EMA: (.770833, .229167)
    ("reference", [0.7 * 5 / 6 + 0.3 * 0.625, 0.7 / 6 + 0.3 * 0.375]),
])
def test_estimate_prior_hand_computed(mode, want):
    prior, hist = estimate_prior([TableLM(A), TableLM(B)], [[0, 1, 2], [1, 2, 3], [3]], mode=mode,
                                 return_history=True)
    assert len(hist) == 2  # the 1-token sequence is skipped
    close(prior, want)
    first = [0.625, 0.375] if mode == "paper" else [5 / 6, 1 / 6]
    close(hist[0], first)


def test_ensemble_rejects_bad_input():
    with pytest.raises(ValueError):
        EnsembleLM([TableLM(A), TableLM(table({}, vocab=5))])
    with pytest.raises(ValueError):
        EnsembleLM([TableLM(A)], mode="nope")
    with pytest.raises(ValueError):
        EnsembleLM([TableLM(A), TableLM(B)], [1.0])
    with pytest.raises(ValueError):
        estimate_prior([TableLM(A)], [[1]])


@pytest.mark.parametrize("mode,w,q", [("paper", PAPER_W, PAPER_Q), ("reference", REF_W, REF_Q)])
def test_left_padding_is_no_evidence(mode, w, q):
    """A row left-padded in a batch gets the hand-computed weights of the row alone (spec §6), in one call
    and continued through the cache; padding is never evidence (the engine batches rows this way)."""
    ens = EnsembleLM([TableLM(A), TableLM(B)], [0.7, 0.3], mode=mode).eval()
    ids = torch.tensor([[3, 3] + SEQ, [1, 2, 0, 1, 2, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    out = ens(input_ids=ids, attention_mask=mask)
    close(observed(out.logits[:1, 2:], SEQ), q)
    close(out.weights[0, 2:5], w)
    # the same row fed in two chunks, the first of them all padding but one token
    a = ens(input_ids=ids[:, :3], attention_mask=mask[:, :3])
    b = ens(input_ids=ids[:, 3:], attention_mask=mask, cache=a.cache)
    close(observed(torch.cat([a.logits[:1, 2:], b.logits[:1]], 1), SEQ), q)
    close(b.cache.loglik[0], P_OBS.log().sum(1), 1e-6)


# ---------------------------------------------------------------------------------------------
# Tiny real GPT-2s through experts.hf.generation

ALPHABET = "<" + "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "  # id 0 is EOS


class CharTokenizer:
    """64 ids: 0 is EOS/BOS, the rest one character each."""

    bos_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ALPHABET.index(c, 1) for c in text]}

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return "".join("" if (i == 0 and skip_special_tokens) else ALPHABET[i] for i in ids)

    def convert_ids_to_tokens(self, i):
        return ALPHABET[i]


def gpt2(seed: int, n_positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    # initializer_range 0.5 (not 0.02): peaked, disagreeing experts, so the posterior really moves
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=n_positions, bos_token_id=0,
                     eos_token_id=0, initializer_range=0.5)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def gpts():
    return [gpt2(1), gpt2(2), gpt2(3)]


TOK = CharTokenizer()
TEXT = "the quick brown fox jumps"


def direct_mixture(models, prior, ids, mode):
    """The mixture computed from each expert's full-context forward, one position at a time."""
    with torch.no_grad():
        lps = [torch.log_softmax(m(input_ids=torch.tensor([ids])).logits[0].double(), -1) for m in models]
    log_prior = torch.log(torch.tensor(prior, dtype=torch.float64))
    rows = []
    for t in range(len(ids)):
        if mode == "paper":
            zero = torch.tensor(0.0, dtype=torch.float64)
            ll = torch.stack([sum((lp[s - 1, ids[s]] for s in range(1, t + 1)), zero) for lp in lps])
            logw = torch.log_softmax(log_prior + ll, 0)
        elif t == 0:
            logw = torch.full((len(models),), -math.log(len(models)), dtype=torch.float64)
        else:
            logw = torch.log_softmax(log_prior + torch.stack([lp[t - 1, ids[t]] for lp in lps]), 0)
        rows.append(torch.logsumexp(logw[:, None] + torch.stack([lp[t] for lp in lps]), 0))
    return torch.stack(rows)  # [T, V]


@pytest.mark.parametrize("backend", ["stacked", "loop", "vmap"])
@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_score_ids_equals_direct_mixture(gpts, backend, mode):
    prior = [0.5, 0.3, 0.2]
    ens = EnsembleLM(gpts, prior, mode=mode, backend=backend).eval()
    assert ens.config.backend == backend
    ids = generation.encode(TOK, TEXT)
    got = generation.score_ids(ens, TOK, ids, top_logprobs=3)
    want = direct_mixture(gpts, prior, ids, mode)
    assert got[0].logprob is None
    close([t.logprob for t in got[1:]], [float(want[i, ids[i + 1]]) for i in range(len(ids) - 1)])
    top = torch.topk(want[2], 3).values
    close([v for _, v in got[3].top], top)


@pytest.mark.parametrize("backend", ["stacked", "loop"])
@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_generation_with_cache_equals_without(gpts, backend, mode):
    ens = EnsembleLM(gpts[:2], [0.6, 0.4], mode=mode, backend=backend)
    params = GenerationParams(max_tokens=12, temperature=0.0, logprobs=0, n=2)
    res = sync.generate(ens, TOK, "hello world", params)
    ids = generation.encode(TOK, "hello world")
    want_ids, want_lp = [], []
    with torch.inference_mode():
        for _ in range(12):
            lp = ens(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            nxt = int(torch.argmax(lp))
            if nxt == TOK.eos_token_id:
                break
            want_ids.append(nxt)
            want_lp.append(float(lp[nxt]))
            ids.append(nxt)
    for ch in res.choices:
        assert [t.token_id for t in ch.tokens] == want_ids
        close([t.logprob for t in ch.tokens], want_lp)
    assert res.choices[0].text == TOK.decode(want_ids)
    assert len(set(want_ids)) > 3  # not a degenerate repetition


@pytest.mark.parametrize("mode", ["paper", "reference"])
def test_last_only_gives_the_last_mixture_and_the_same_cache(gpts, mode):
    """What the engine asks of a prefill: the mixture at the last position only, and a cache that continues
    exactly as the full forward's does (left padding included)."""
    ens = EnsembleLM(gpts, [0.5, 0.3, 0.2], mode=mode).eval()
    ids = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, :3] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.inference_mode():
        full = ens(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        last = ens(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, last_only=True)
        assert last.logits.shape == (3, 1, full.logits.shape[-1])
        close(last.logits[:, 0].flatten(), full.logits[:, -1].flatten())
        close(last.cache.loglik.flatten(), full.cache.loglik.flatten())
        close(last.cache.last_logprobs.flatten(), full.cache.last_logprobs.flatten())
        nxt = torch.tensor([[5], [6], [7]])
        m2 = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        a = ens(input_ids=nxt, attention_mask=m2, position_ids=pos[:, -1:] + 1, cache=full.cache, use_cache=True)
        b = ens(input_ids=nxt, attention_mask=m2, position_ids=pos[:, -1:] + 1, cache=last.cache, use_cache=True,
                last_only=True)
        close(b.logits[:, -1].flatten(), a.logits[:, -1].flatten())


def test_k1_equals_the_single_expert(gpts):
    ens = EnsembleLM(gpts, [0.3, 0.5, 0.2], top_k=1)
    assert ens.selected == [1]
    params = GenerationParams(max_tokens=15, temperature=0.0, logprobs=2, echo=True)
    got = sync.generate(ens, TOK, "abc", params)
    want = sync.generate(gpts[1], TOK, "abc", params)
    assert got.choices[0].text == want.choices[0].text
    close([t.logprob for t in got.choices[0].tokens], [t.logprob for t in want.choices[0].tokens])
    ids = generation.encode(TOK, TEXT)
    close([t.logprob for t in generation.score_ids(ens, TOK, ids)[1:]],
          [t.logprob for t in generation.score_ids(gpts[1], TOK, ids)[1:]])


def test_backends_agree_batched_with_cache(gpts):
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    outs = {}
    for backend in ("stacked", "loop", "vmap"):
        ens = EnsembleLM(gpts, [0.2, 0.3, 0.5], backend=backend)
        with torch.inference_mode():
            a = ens(input_ids=ids[:, :5])
            b = ens(input_ids=ids[:, 5:6], cache=a.cache)
            c = ens(input_ids=ids[:, 6:], cache=b.cache)
        outs[backend] = torch.cat([a.logits, b.logits, c.logits], 1)
    with torch.inference_mode():
        full = EnsembleLM(gpts, [0.2, 0.3, 0.5], backend="loop")(input_ids=ids, use_cache=False).logits
    for got in outs.values():
        close(got, full)


def test_stacked_kv_buffers_grow_past_their_first_capacity():
    models = [gpt2(5, n_positions=200), gpt2(6, n_positions=200)]
    ids = torch.randint(1, 64, (1, 150), generator=torch.Generator().manual_seed(1))
    ens = EnsembleLM(models, [0.4, 0.6], backend="stacked")
    with torch.inference_mode():
        a = ens(input_ids=ids[:, :70])  # capacity 70
        b = ens(input_ids=ids[:, 70:71], cache=a.cache)  # grows to 140
        c = ens(input_ids=ids[:, 71:], cache=b.cache)  # grows to 150
        full = EnsembleLM(models, [0.4, 0.6], backend="loop")(input_ids=ids, use_cache=False).logits
    assert c.cache.length == 150
    close(torch.cat([a.logits, b.logits, c.logits], 1), full)


def test_config_context_is_min_of_members_and_auto_backend(gpts):
    short = gpt2(4, n_positions=48)
    ens = EnsembleLM([gpts[0], short])
    assert generation.context_length(ens) == 48 and ens.config.n_positions == 48
    assert ens.config.backend == "stacked"
    assert EnsembleLM([TableLM(A), TableLM(B)]).config.backend == "loop"


def test_estimate_prior_on_gpts_is_a_distribution(gpts):
    seqs = [generation.encode(TOK, s) for s in ["hello there", "general kenobi", "abc abc abc"]]
    p = estimate_prior(gpts, seqs)
    assert p.shape == (3,) and float(p.sum()) == pytest.approx(1.0)
    close(p, estimate_prior(gpts, seqs, backend="loop"))
