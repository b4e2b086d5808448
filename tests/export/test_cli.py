"""`pmkvq export` (custom flavor) on a saved tiny model directory, then `pmkvq generate --onnx`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pmkvq_compile import Plan
from pmkvq_compile.cli import main
from pmkvq_compile.export import OrtGenerator
from tests.models import tiny


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 96)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="</s>")


def test_export_then_generate(tmp_path: Path, capsys) -> None:
    model = tiny("llama")
    src = tmp_path / "model"
    model.save_pretrained(src)
    _tokenizer().save_pretrained(src)
    Plan.uniform(model.config, 4, 64, n_window=8).save(tmp_path / "plan")
    out = tmp_path / "onnx"
    args = ["export", str(src), "--plan", str(tmp_path / "plan"), "--out", str(out), "--flavor", "custom"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert {"decoder.onnx", "plan", "tokenizer", "pmkvq_onnx.json"} <= {p.name for p in out.iterdir()}
    prompt = "w5 w17 w33 w2 w71 w9"
    rc = main(["generate", "--onnx", str(out), "--prompt", prompt, "--max-new-tokens", "40", "--no-chat"])
    assert rc == 0
    text = capsys.readouterr().out
    # what the CLI printed is the greedy continuation OrtGenerator produces for the same prompt
    ids = np.array([[int(w[1:]) for w in prompt.split()]])
    gen = OrtGenerator(out)
    greedy = gen.generate(ids, 40, stop_at_eos=True)
    assert text.split("\n")[0].split() == [f"w{i}" for i in greedy[0] if i > 1]
    assert gen.body_bits(0)[0] < 16  # the progression ran
    assert f"{greedy.shape[1]} tokens in" in text and f"body bits (K, V) now [{gen.body_bits(0)}]" in text
