"""Calibration data: accepted forms, refusals, reproducible self-generated text."""

from __future__ import annotations

import pytest
import torch

from pmkvq_compile.calibration import generate_samples, prepare_samples
from tests.models import tiny


class _Tok:
    """A stand-in tokenizer: one id per character."""

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 96 for c in text]}


def test_accepted_forms_are_cut_into_samples() -> None:
    ids = torch.arange(10)
    assert [s.tolist() for s in prepare_samples(ids, seq_len=4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    two = prepare_samples(torch.zeros(2, 5, dtype=torch.int64), seq_len=8)
    assert [s.numel() for s in two] == [5, 5]
    listed = prepare_samples([torch.arange(3), torch.arange(1)], seq_len=8)  # the 1-token piece is dropped
    assert [s.tolist() for s in listed] == [[0, 1, 2]]
    texts = prepare_samples(["abcdef", "  "], tokenizer=_Tok(), seq_len=4)
    assert [s.numel() for s in texts] == [4, 2] and texts[0].dtype == torch.int64


@pytest.mark.parametrize(
    ("data", "kw", "match"),
    [
        ([], {}, "not supported|empty"),
        (torch.zeros(0, dtype=torch.int64), {}, "empty"),
        ([""], {"tokenizer": _Tok()}, "empty"),
        (["some text"], {}, "need a tokenizer"),
        (torch.tensor([1, 200]), {"vocab_size": 96}, r"\[0, 96\)"),
        (torch.ones(3, dtype=torch.float32), {}, "integer tensor"),
        (torch.ones(2, 2, 2, dtype=torch.int64), {}, r"\[T\] or \[N, T\]"),
        (3.5, {}, "not supported"),
    ],
)
def test_refusals(data, kw, match) -> None:
    with pytest.raises(ValueError, match=match):
        prepare_samples(data, seq_len=8, **kw)


def test_self_generated_text_is_seeded_and_leaves_the_rng_alone() -> None:
    model = tiny("llama")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = generate_samples(model, tokenizer=None, n_samples=2, seq_len=24, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_samples(model, tokenizer=None, n_samples=2, seq_len=24, seed=7, progress=False)
    c = generate_samples(model, tokenizer=None, n_samples=2, seq_len=24, seed=8, progress=False)
    assert [s.numel() for s in a] == [24, 24]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
