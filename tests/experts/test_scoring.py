"""exact_match: an example counts only when every scored token (newline included) is the argmax."""

from __future__ import annotations

import torch

from experts.data.scoring import Encoded, exact_match, make_batches


class _Peeker:
    """Predicts the true next token everywhere, except after token `wrong_after` (it predicts 0 there)."""

    def __init__(self, vocab: int, wrong_after: int | None = None) -> None:
        self.vocab, self.wrong_after = vocab, wrong_after

    def __call__(self, input_ids: torch.Tensor, use_cache: bool = False) -> object:
        nxt = torch.roll(input_ids, -1, dims=1)
        if self.wrong_after is not None:
            nxt = torch.where(input_ids == self.wrong_after, torch.zeros_like(nxt), nxt)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float()
        return type("Out", (), {"logits": logits})()


def _batches() -> list:
    # prompt tokens 5 6 | completion 7 8 9 (scored from position 2); the second example's completion 7 3 9
    enc = [Encoded((5, 6, 7, 8, 9), 2), Encoded((5, 6, 7, 3, 9), 2), Encoded((4, 4, 7, 8, 9), 2)]
    return make_batches(enc, pad_id=1)


def test_a_perfect_model_matches_every_example():
    assert exact_match(_Peeker(16), _batches()) == (1.0, 1.0)


def test_one_wrong_token_fails_its_whole_example():
    # wrong after token 3: only the second example's last completion token (9) is mispredicted
    em, acc = exact_match(_Peeker(16, wrong_after=3), _batches())
    assert em == 2 / 3
    assert acc == 8 / 9
