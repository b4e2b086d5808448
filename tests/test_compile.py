"""``pmkvq_compile.compile(model, plan)``: the fused-op path against the eager reference cache, no recompiles."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import pmkvq_compile as pk
from pmkvq_compile.models import cache_kwarg
from tests.models import tiny


def _reference_generate(model, plan, ids, n):
    cache = pk.ProgressiveKVCache(plan, model.config)
    with pk.use_pmkvq_attention(model):
        return model.generate(
            ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            **{cache_kwarg(model): cache},
        )


@pytest.mark.parametrize(
    "arch,scale_dtype",
    [("llama", "float32"), ("qwen2", "float32"), ("mistral", "float32"), ("llama", "float16")],
)
def test_compiled_generate_matches_eager_reference_with_progression(arch: str, scale_dtype: str) -> None:
    torch._dynamo.reset()
    counters.clear()
    model = tiny(arch)
    plan = pk.Plan.uniform(model.config, 2, 160, n_window=8, scale_dtype=scale_dtype)
    cm = pk.compile(model, plan, backend="eager")
    ids = torch.randint(3, 96, (1, 12))
    out = cm.generate(ids, max_new_tokens=140)
    ref = _reference_generate(model, plan, ids, 140)
    assert torch.equal(out, ref)
    assert cm.cache.body_bits(0) == (2, 2)  # the body went 16 -> 8 -> 4 -> 2 during decode
    assert cm.cache.nbytes() <= plan.total_budget_bytes
    assert counters["stats"]["unique_graphs"] == 1  # one decode graph: no recompile across steps or bit drops
    assert model.config._attn_implementation != "pmkvq_packed"  # restored


def test_no_recompiles_over_200_steps_batch_2() -> None:
    torch._dynamo.reset()
    counters.clear()
    model = tiny("llama")
    plan = pk.Plan.uniform(model.config, 4, 256, n_window=16)
    cm = pk.compile(model, plan, batch_size=2, backend="eager")
    ids = torch.randint(3, 96, (2, 20))
    out = cm.generate(ids, max_new_tokens=201)
    assert out.shape == (2, 221)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0 if "recompiles" in counters else True
    assert cm.cache.body_bits(1) == (4, 4)
    assert cm.cache.allocated_bytes() == 2 * plan.total_budget_bytes


def test_compiled_with_inductor() -> None:
    """The default torch.compile backend (Inductor) around the fused ops."""
    torch._dynamo.reset()
    model = tiny("qwen2", num_hidden_layers=1)
    plan = pk.Plan.uniform(model.config, 4, 64, n_window=8)
    cm = pk.compile(model, plan)
    ids = torch.randint(3, 96, (1, 9))
    assert torch.equal(cm.generate(ids, max_new_tokens=30), _reference_generate(model, plan, ids, 30))


def test_sampling_is_seeded() -> None:
    model = tiny("llama")
    cm = pk.compile(model, pk.Plan.uniform(model.config, 4, 96, n_window=8), backend="eager")
    ids = torch.randint(3, 96, (1, 5))
    a = cm.generate(
        ids, max_new_tokens=12, do_sample=True, top_k=20, generator=torch.Generator().manual_seed(3)
    )
    b = cm.generate(
        ids, max_new_tokens=12, do_sample=True, top_k=20, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a, b) and a.shape == (1, 17)


def test_refusals_leave_nothing_changed() -> None:
    model = tiny("llama")
    plan = pk.Plan.uniform(model.config, 2, 40, n_window=8)
    cm = pk.compile(model, plan, backend="eager")
    ids = torch.randint(3, 96, (1, 8))
    with pytest.raises(ValueError, match="padded batches"):
        cm.generate(ids, attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]]))
    with pytest.raises(ValueError, match=r"input_ids must be \[1, T\]"):
        cm.generate(torch.randint(3, 96, (2, 8)))
    with pytest.raises(pk.BudgetExceededError, match="layer 0"):
        cm.generate(ids, max_new_tokens=200)
    with pytest.raises(ValueError, match="transformers causal LM"):
        pk.compile(torch.nn.Linear(2, 2), plan)
    with pytest.raises(pk.PlanMismatchError):
        pk.compile(tiny("llama", num_key_value_heads=4), plan)
    mistral = tiny("mistral")
    mistral.config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding_window=16"):
        pk.compile(mistral, pk.Plan.uniform(mistral.config, 4, 64))


def test_budget_error_names_the_bytes_and_rows_stop_at_eos() -> None:
    model = tiny("llama")
    plan = pk.Plan.uniform(model.config, 2, 40, n_window=8)
    cm = pk.compile(model, plan, batch_size=2, backend="eager")
    ids = torch.randint(3, 96, (2, 8))
    with pytest.raises(pk.BudgetExceededError) as e:
        cm.generate(ids, max_new_tokens=200)
    lay = cm.cache.layers[0].st.layout
    assert (
        e.value.length == cm.cache.layers[0].capacity + 1
        and e.value.needed > e.value.budget == lay.budget_bytes
    )
    out = cm.generate(ids, max_new_tokens=12)
    eos = int(out[0, 9])  # pretend row 0's second generated token is the end of sequence
    got = cm.generate(ids, max_new_tokens=12, eos_token_id=eos)
    first = int((got[0, 8:] == eos).nonzero()[0])
    assert (got[0, 8 + first :] == eos).all()  # a finished row keeps emitting eos
    assert got.shape[1] <= out.shape[1]
