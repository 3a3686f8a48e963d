"""Pieces of generation: the prompt encoder and the engine's per-step text decoder."""

from __future__ import annotations

import copy

from experts.hf.generation import encode, text_decoder


def test_text_decoder_matches_the_tokenizer_and_skips_its_python_layer(tokenizer, monkeypatch):
    ids = [*range(0, len(tokenizer), 3), tokenizer.eos_token_id]
    expected = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    decode = text_decoder(tokenizer)
    monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: (_ for _ in ()).throw(AssertionError("slow path")))
    assert decode(ids) == expected


def test_a_tokenizer_with_its_own_decode_keeps_it(tokenizer):
    class Custom(type(tokenizer)):
        def _decode(self, token_ids, **kwargs):
            return "custom"

    custom = Custom.__new__(Custom)
    custom.__dict__.update(tokenizer.__dict__)
    assert text_decoder(custom)([1, 2]) == "custom"


TEXTS = ["", "hello world", "  two  spaces\tand a tab\n", "caf\u00e9 \u2603 \U0001f600", "a<|endoftext|>b", "x" * 300]


def test_encode_gives_the_tokenizers_ids_without_its_python_layer(tokenizer, monkeypatch):
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    wrapper = type(tokenizer).set_truncation_and_padding  # the wrapper's first step on every call
    monkeypatch.setattr(type(tokenizer), "set_truncation_and_padding",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("slow path")))
    assert type(tokenizer).set_truncation_and_padding is not wrapper
    got = [encode(tokenizer, t) for t in TEXTS]
    monkeypatch.undo()
    assert got == expected
    assert any(len(ids) > 1 for ids in got) and got[0] == []


def test_encode_keeps_the_wrapper_where_it_changes_the_ids(tokenizer):
    """A backend that truncates (the wrapper switches that off) and a class with its own encoding keep the call."""
    clone = copy.deepcopy(tokenizer)
    clone.backend_tokenizer.enable_truncation(max_length=3)
    assert len(encode(clone, TEXTS[-1])) == len(tokenizer(TEXTS[-1], add_special_tokens=False)["input_ids"]) > 3

    class Custom(type(tokenizer)):
        def _encode_plus(self, *args, **kwargs):
            out = super()._encode_plus(*args, **kwargs)
            out["input_ids"] = [7, *out["input_ids"]]
            return out

    custom = Custom.__new__(Custom)
    custom.__dict__.update(tokenizer.__dict__)
    assert encode(custom, "hello")[0] == 7
