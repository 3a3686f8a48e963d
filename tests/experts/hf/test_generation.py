"""Pieces of generation: the engine's per-step text decoder."""

from __future__ import annotations

from experts.hf.generation import text_decoder


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
