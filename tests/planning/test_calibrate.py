"""calibrate() end to end on tiny models, its refusals, and the calibrate / plan show commands."""

from __future__ import annotations

import pytest
import torch

from pmkvq_compile import Plan, ProgressiveKVCache, use_pmkvq_attention
from pmkvq_compile.calibrate import calibrate
from pmkvq_compile.cli import main
from pmkvq_compile.models import cache_kwarg
from pmkvq_compile.planning import InfeasibleBudgetError, bits_budget
from tests.models import tiny

KW = dict(max_len=128, n_window=8, n_samples=2, seq_len=32, progress=False)


@pytest.mark.parametrize(("arch", "separate_kv"), [("llama", False), ("qwen2", True)])
def test_calibrate_end_to_end(arch: str, separate_kv: bool) -> None:
    model = tiny(arch, num_hidden_layers=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = calibrate(model, budget="3bit", separate_kv=separate_kv, **KW)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # fold=False: untouched
    proto = Plan.uniform(model.config, 2, 128, n_window=8)
    assert plan.total_budget_bytes <= bits_budget(proto, 3)
    assert {lp.key_bits for lp in plan.layers} | {lp.value_bits for lp in plan.layers} <= {4, 2}
    assert all(lp.key_scale is not None and lp.key_scale.shape == (2, 8) for lp in plan.layers)
    assert not plan.key_scales_folded and plan.metadata["pi_effective_len"] == "128"
    # the plan runs: 128 tokens fit its budgets
    ids = torch.randint(0, 96, (1, 128), generator=torch.Generator().manual_seed(0))
    cache = ProgressiveKVCache(plan, model.config)
    with use_pmkvq_attention(model), torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg(model): cache})
    assert cache.get_seq_length() == 128
    # same seed, same plan
    assert calibrate(model, budget="3bit", separate_kv=separate_kv, **KW) == plan


def test_calibrate_with_token_ids_and_fold() -> None:
    model = tiny("llama")
    ids = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
    unfolded = calibrate(tiny("llama"), ids, budget="4bit", bit_choices=(8, 4, 2), **KW)
    plan = calibrate(model, ids, budget="4bit", bit_choices=(8, 4, 2), fold=True, **KW)
    assert plan.key_scales_folded and plan.metadata["calibration_samples"] == "2"
    w = tiny("llama").model.layers[0].self_attn.k_proj.weight
    s = torch.cat([plan.layers[0].key_scale] * 2, -1).reshape(-1, 1)
    torch.testing.assert_close(model.model.layers[0].self_attn.k_proj.weight, w / s, rtol=1e-6, atol=1e-7)
    assert [lp.key_bits for lp in plan.layers] == [lp.key_bits for lp in unfolded.layers]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"budget": 1000}, r"smallest feasible budget is [\d,]+ bytes"),
        ({"budget": "1.5bit"}, "outside the supported range"),
        (
            {"budget": "3bit", "bit_choices": (3,)},
            r"bit choice=3 is not supported; expected one of \[16, 8, 4, 2\]",
        ),
        ({"budget": "3bit", "max_len": 1024}, "max_len=1024 exceeds the model's max_position_embeddings=512"),
        (
            {"budget": "3bit", "calibration": torch.zeros(1, 0, dtype=torch.int64)},
            "calibration data is empty",
        ),
        ({"budget": "lots"}, "budget='lots' is not understood"),
    ],
)
def test_bad_input_is_refused_before_any_work(kw: dict, match: str) -> None:
    model = tiny("llama")
    args = {**KW, **kw}
    with pytest.raises(ValueError, match=match):
        calibrate(model, **args)


def test_budget_below_minimum_names_it_exactly() -> None:
    model = tiny("llama")
    floor = 2 * Plan.uniform(model.config, 2, 128, n_window=8).budget_for(2, 2)
    with pytest.raises(InfeasibleBudgetError) as e:
        calibrate(model, budget=floor - 1, **KW)
    assert e.value.min_budget == floor and f"{floor:,} bytes" in str(e.value)


def test_cli_calibrate_and_show(tmp_path, capsys) -> None:
    model_dir = tmp_path / "model"
    tiny("qwen2").save_pretrained(model_dir)
    out = tmp_path / "plan"
    common = [
        "calibrate",
        "--model",
        str(model_dir),
        "--max-len",
        "256",
        "--window",
        "16",
        "--n-samples",
        "1",
    ]
    common += ["--seq-len", "32"]
    assert main([*common, "--out", str(out), "--budget", "2.5bit", "--bits", "8,4,2", "--separate-kv"]) == 0
    assert (out / "plan.json").is_file() and (out / "tensors.safetensors").is_file()
    plan = Plan.load(out)
    assert plan.metadata["separate_kv"] == "true" and plan.layers[0].key_scale is not None
    capsys.readouterr()
    assert main(["plan", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "K bits" in shown and "budget bytes" in shown and "bit_choices: 8,4,2" in shown
    # refusals: one line, nothing written
    for bad, match in (
        (["--budget", "100"], "smallest feasible budget"),
        (["--bits", "4,3"], "bit choice=3"),
        (["--max-len", "4096"], "max_position_embeddings=512"),
    ):
        target = tmp_path / f"bad{len(bad[1])}"
        assert main([*common, "--out", str(target), *bad]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err
        assert not target.exists()
    assert main([*common, "--out", str(out)]) == 2  # existing plan needs --force
    assert "--force" in capsys.readouterr().err
    assert main(["plan", "show", str(tmp_path / "nowhere")]) == 2


@pytest.mark.slow
def test_calibrate_embedded_smollm2() -> None:
    from pmkvq_compile.models import load_embedded_model

    model, tok = load_embedded_model()
    text = "The quick brown fox jumps over the lazy dog. " * 20
    plan = calibrate(
        model, [text], tokenizer=tok, budget="3bit", max_len=2048, seq_len=64, n_samples=1, progress=False
    )
    proto = Plan.uniform(model.config, 2, 2048)
    assert plan.total_budget_bytes <= bits_budget(proto, 3)
    bits = [lp.key_bits for lp in plan.layers]
    assert 4 in bits and 2 in bits and len(bits) == 30  # a 3-bit budget mixes 4- and 2-bit layers
    assert plan.layers[0].key_scale.shape == (3, 32)
