"""The eager path end to end: ``generate`` with the progressive cache through ``attn_implementation="pmkvq"``."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from pmkvq_compile import Plan, ProgressiveKVCache, use_pmkvq_attention
from pmkvq_compile.models import cache_kwarg
from tests.models import tiny


def _inputs(batch: int = 2, length: int = 12, pad: int = 3):
    torch.manual_seed(1)
    ids = torch.randint(3, 96, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0  # left padding on the first row
    ids[0, :pad] = 0
    return ids, mask


def _generate(model, ids, mask, n, cache=None):
    kw = {cache_kwarg(model): cache} if cache is not None else {}
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw
    )


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_16bit_plan_matches_unquantized_generate(arch: str) -> None:
    model = tiny(arch)
    ids, mask = _inputs()
    ref = _generate(model, ids, mask, 40)
    plan = Plan.uniform(model.config, 16, 64, n_window=8)
    cache = ProgressiveKVCache(plan, model.config)
    with use_pmkvq_attention(model):
        out = _generate(model, ids, mask, 40, cache)
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == 12 + 40 - 1  # the last token is produced, never cached
    assert model.config._attn_implementation != "pmkvq"  # restored on exit


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_low_bit_plan_logits_follow_the_reference_attention(arch: str) -> None:
    """Teacher-forced logits with a 2-bit plan: close to unquantized, and really different from it."""
    model = tiny(arch)
    torch.manual_seed(2)
    ids = torch.randint(3, 96, (1, 60))
    with torch.no_grad():
        ref = model(ids).logits
        plan = Plan.uniform(model.config, 2, 60, n_window=8)
        cache = ProgressiveKVCache(plan, model.config)
        got = []
        with use_pmkvq_attention(model):
            got.append(model(ids[:, :20], **{cache_kwarg(model): cache}).logits)
            for t in range(20, 60):
                got.append(model(ids[:, t : t + 1], **{cache_kwarg(model): cache}).logits)
        got = torch.cat(got, dim=1)
    assert cache.body_bits(0) == (2, 2)
    # prefill attends to its own tokens in full precision: identical logits
    torch.testing.assert_close(got[:, :20], ref[:, :20], rtol=1e-5, atol=1e-5)
    diff = (got[:, 20:] - ref[:, 20:]).abs().max()
    assert 1e-4 < diff < 0.5 * ref.abs().max()
    agree = (got[:, 20:].argmax(-1) == ref[:, 20:].argmax(-1)).float().mean()
    assert agree > 0.6


def test_pmkvq_attention_without_progressive_cache_is_plain_attention() -> None:
    model = tiny("llama")
    ids, mask = _inputs()
    ref = _generate(model, ids, mask, 10, DynamicCache(config=model.config))
    with use_pmkvq_attention(model):
        out = _generate(model, ids, mask, 10, DynamicCache(config=model.config))
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_embedded_smollm2_16bit_plan_is_lossless_for_64_tokens() -> None:
    from pmkvq_compile.models import load_embedded_model

    model, tok = load_embedded_model()
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (30, 3)
    msgs = [{"role": "user", "content": "List three prime numbers and explain why each is prime."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    mask = torch.ones_like(ids)
    ref = _generate(model, ids, mask, 64)
    plan = Plan.uniform(model.config, 16, ids.shape[1] + 64)
    cache = ProgressiveKVCache(plan, model.config, batch_size=1)
    with use_pmkvq_attention(model):
        out = _generate(model, ids, mask, 64, cache)
    assert torch.equal(out, ref), (tok.decode(ref[0, ids.shape[1] :]), tok.decode(out[0, ids.shape[1] :]))
