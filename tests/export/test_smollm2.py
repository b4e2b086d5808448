"""Parity of the ONNX Runtime path with the PyTorch eager path on the embedded SmolLM2-135M-Instruct.

One standard-flavor export (made with the 8-bit plan) serves the 16-, 8- and 4-bit plans: the standard graphs
depend on the plan only through its sink/window/group settings (``OrtGenerator(plan=...)`` checks that).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pmkvq_compile import Plan, ProgressiveKVCache, use_pmkvq_attention
from pmkvq_compile.export import OrtGenerator, to_onnx
from pmkvq_compile.models import cache_kwarg

N_NEW = 64
WINDOW = 16

PROMPT = "List three prime numbers and explain why each is prime."


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from pmkvq_compile.models import load_embedded_model

    model, tok = load_embedded_model()
    msgs = [{"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    out = tmp_path_factory.mktemp("smol") / "onnx"
    to_onnx(model, _plan(model, 8, ids), out, tokenizer=tok)
    return model, tok, ids, out


def _plan(model, bits: int, ids: torch.Tensor) -> Plan:
    return Plan.uniform(model.config, bits, ids.shape[1] + N_NEW, n_window=WINDOW)


def _eager_greedy(model, plan: Plan, ids: torch.Tensor) -> tuple[torch.Tensor, ProgressiveKVCache]:
    cache = ProgressiveKVCache(plan, model.config, batch_size=1)
    with use_pmkvq_attention(model):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=N_NEW,
            min_new_tokens=N_NEW,
            do_sample=False,
            **{cache_kwarg(model): cache},
        )
    return out[:, ids.shape[1] :], cache


@pytest.mark.slow
def test_smollm2_64_greedy_tokens_identical_with_16_and_8_bit_plans(smol) -> None:
    model, tok, ids, out = smol
    for bits in (16, 8):
        plan = _plan(model, bits, ids)
        ref, cache = _eager_greedy(model, plan, ids)
        gen = OrtGenerator(out, plan=plan)
        got = gen.generate(ids.numpy(), N_NEW)
        assert gen.body_bits(0) == cache.body_bits(0) == (bits, bits)  # the 8-bit run went 16 -> 8
        np.testing.assert_array_equal(
            got, ref.numpy(), err_msg=tok.decode(got[0]) + "\n---\n" + tok.decode(ref[0])
        )


@pytest.mark.slow
def test_smollm2_4bit_teacher_forced_logits_and_greedy_texts(smol, capsys) -> None:
    """Teacher-forced on the eager greedy tokens for 64 steps. ORT and PyTorch compute K/V with different
    float32 summation orders; at 4 bits a last-ulp difference that crosses a rounding boundary moves a code by
    a whole step (1/15 of the group's range), so the logits are not equal bit for bit. Tolerance, stated
    against the quantization's own error (4-bit eager vs unquantized, same tokens): the median step differs
    by at most a quarter of the median quantization error, no step by more than the largest quantization
    error, and the top-1 token agrees on at least 60 of 64 steps."""
    from transformers import DynamicCache

    model, tok, ids, out = smol
    plan = _plan(model, 4, ids)
    cache = ProgressiveKVCache(plan, model.config, batch_size=1)
    full = DynamicCache(config=model.config)
    gen = OrtGenerator(out, plan=plan)
    gen.reset(1)
    d_ort, d_quant, agree, ref_tokens = [], [], 0, []
    with torch.no_grad():
        x = ids
        for _ in range(N_NEW):
            with use_pmkvq_attention(model):
                ref = model(x, **{cache_kwarg(model): cache}).logits[:, -1]
            unq = model(x, **{cache_kwarg(model): full}).logits[:, -1]
            got = gen.step(x.numpy())[:, -1]
            d_ort.append(float(np.abs(got - ref.numpy()).max()))
            d_quant.append(float((ref - unq).abs().max()))
            agree += int(got.argmax() == int(ref.argmax()))
            ref_tokens.append(int(ref.argmax()))
            x = torch.tensor([[ref_tokens[-1]]])
    assert cache.body_bits(0) == gen.body_bits(0) == (4, 4)
    assert np.median(d_ort) <= 0.25 * np.median(d_quant), (d_ort, d_quant)
    assert max(d_ort) <= max(d_quant), (d_ort, d_quant)
    assert agree >= 60
    ort_tokens = OrtGenerator(out, plan=plan).generate(ids.numpy(), N_NEW)
    same = int(np.cumprod(ort_tokens[0] == np.array(ref_tokens)).sum())
    with capsys.disabled():
        print(
            f"\n4-bit plan, {N_NEW} teacher-forced steps: |ORT - PyTorch| max {max(d_ort):.3f} median "
            f"{np.median(d_ort):.3f}; |PyTorch 4-bit - unquantized| max {max(d_quant):.3f} median "
            f"{np.median(d_quant):.3f}; top-1 agreement {agree}/{N_NEW}"
        )
        print(f"--- PyTorch eager ---\n{tok.decode(ref_tokens, skip_special_tokens=True)}")
        print(
            f"--- ONNX Runtime (standard flavor) ---\n{tok.decode(ort_tokens[0], skip_special_tokens=True)}"
        )
        print(f"identical greedy prefix: {same}/{N_NEW}")
