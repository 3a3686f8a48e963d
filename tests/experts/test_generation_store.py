"""Unit tests: generation details (stop hold-back, seeds, n) and archive safety."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from experts.base import GenerationParams, StreamDelta
from experts.errors import GenerationInputError, InvalidExpertError
from experts.hf.engine.sync import generate, stream_generate
from experts.hf.generation import score_ids, start_ids
from experts.hf.validation import is_model_file
from experts.repository.archives import safe_extract


@pytest.fixture(scope="module")
def model(tokenizer):
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(1)
    return GPT2LMHeadModel(cfg).eval()


def test_stream_never_emits_a_stop_string_split_across_tokens(model, tokenizer):
    base = generate(model, tokenizer, "abc", GenerationParams(max_tokens=30, temperature=0)).choices[0].text
    stop = base[5:9]  # very likely spans a token boundary
    deltas = [e.text for e in stream_generate(model, tokenizer, "abc",
                                              GenerationParams(max_tokens=30, temperature=0, stop=(stop,)))
              if isinstance(e, StreamDelta)]
    assert "".join(deltas) == base[: base.find(stop)]
    for i in range(len(deltas)):
        assert stop not in "".join(deltas[: i + 1])


def test_seeded_sampling_and_n(model, tokenizer):
    p = GenerationParams(max_tokens=10, temperature=1.0, seed=7, n=3)
    a = generate(model, tokenizer, "x", p)
    b = generate(model, tokenizer, "x", p)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert 3 <= a.completion_tokens <= 30


def test_top_p_tiny_is_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, "def", GenerationParams(max_tokens=8, temperature=0)).choices[0].text
    nucleus = generate(model, tokenizer, "def", GenerationParams(max_tokens=8, temperature=1.0, top_p=1e-6,
                                                                 seed=3)).choices[0].text
    assert nucleus == greedy


def test_score_matches_generation_logprobs(model, tokenizer):
    r = generate(model, tokenizer, "import", GenerationParams(max_tokens=6, temperature=0, logprobs=0))
    ids, _ = start_ids(tokenizer, "import")
    ids += [t.token_id for t in r.choices[0].tokens]
    scored = score_ids(model, tokenizer, ids)
    assert [t.logprob for t in scored[-6:]] == pytest.approx([t.logprob for t in r.choices[0].tokens], abs=1e-5)


def test_context_length_checked(model, tokenizer):
    with pytest.raises(GenerationInputError) as e:
        generate(model, tokenizer, "x", GenerationParams(max_tokens=100))
    assert e.value.code == "context_length_exceeded"


def _tar(members: dict[str, bytes], link: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("evil-link")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("members, link, words", [
    ({"../x": b"1"}, False, "escapes"), ({"/abs/x": b"1"}, False, "escapes"),
    ({"ok": b"1"}, True, "not a regular file"), ({"model.safetensors": b"1" * 2000}, False, "over the limit"),
])
def test_safe_extract_refuses(tmp_path, members, link, words):
    arc = tmp_path / "a.tar"
    arc.write_bytes(_tar(members, link))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(InvalidExpertError, match=words):
        safe_extract(arc, dest, max_bytes=1000, keep=is_model_file)
    assert list(dest.iterdir()) == []
