"""Bad input is refused before anything is written; an interrupted export leaves no directory behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from pmkvq_compile import Plan, PlanMismatchError
from pmkvq_compile.cli import main
from pmkvq_compile.export import OrtGenerator, exporter, to_onnx
from tests.models import tiny


def _nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50)).eval()
    plan = Plan.uniform(tiny("llama").config, 4, 64, n_window=8)
    with pytest.raises(ValueError, match=r"model_type='gpt2' is not supported.*llama"):
        to_onnx(gpt2, plan, tmp_path / "out")
    _nothing_written(tmp_path, "out")


@pytest.mark.parametrize(
    ("make_plan", "flavor", "error", "match"),
    [
        (
            lambda m: Plan.uniform(tiny("llama", num_hidden_layers=3).config, 4, 64),
            "standard",
            PlanMismatchError,
            "num_layers",
        ),
        (lambda m: Plan.uniform(m.config, 4, 64, n_sink=0, n_window=8), "standard", ValueError, "n_sink=0"),
        (
            lambda m: Plan.uniform(m.config, 4, 64, n_window=8, scale_dtype="float16"),
            "standard",
            ValueError,
            r"scale_dtype='float16' is not supported by flavor 'standard'.*custom",
        ),
        (
            lambda m: Plan.uniform(m.config, 4, 64, n_window=8),
            "tensorrt",
            ValueError,
            r"flavor='tensorrt'.*custom",
        ),
    ],
)
def test_bad_plans_and_flavors_are_refused(tmp_path: Path, make_plan, flavor, error, match) -> None:
    model = tiny("llama")
    with pytest.raises(error, match=match):
        to_onnx(model, make_plan(model), tmp_path / "out", flavor=flavor)
    _nothing_written(tmp_path, "out")


def test_existing_directory_is_refused(tmp_path: Path) -> None:
    model = tiny("llama")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        to_onnx(model, Plan.uniform(model.config, 4, 64, n_window=8), tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_interrupted_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_way(model, plan, flavor, path, say):
        path.write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "_export_decoder", half_way)
    model = tiny("llama")
    with pytest.raises(KeyboardInterrupt):
        to_onnx(model, Plan.uniform(model.config, 4, 64, n_window=8), tmp_path / "out")
    _nothing_written(tmp_path, "out")
    with pytest.raises(ValueError, match="not a complete pmkvq ONNX export"):
        OrtGenerator(tmp_path)


def test_cli_refuses_an_unsupported_model_dir_before_loading_weights(tmp_path: Path, capsys) -> None:
    src = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_head=2, n_embd=32).save_pretrained(src)  # config only: no weights to load
    plan = Plan.uniform(tiny("llama").config, 4, 64, n_window=8)
    plan.save(tmp_path / "plan")
    rc = main(["export", str(src), "--plan", str(tmp_path / "plan"), "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "model_type='gpt2' is not supported" in capsys.readouterr().err
    _nothing_written(tmp_path, "out")
