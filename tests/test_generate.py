"""Hugging Face generation: each load mode on CPU, real streaming, and refused sampling values."""
import argparse

import pytest

import generate
from helpers import error_line, make_adapter, run_script


def args(**overrides):
    base = dict(max_new_tokens=8, top_p=0.9, temperature=0.7, top_k=50, no_repeat_ngram_size=0,
                num_return_sequences=1, greedy=False)
    base.update(overrides)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("bad, message", [
    ({"top_p": 90}, "top_p is a probability"), ({"top_p": 0}, "top_p is a probability"),
    ({"temperature": 0}, "temperature must be > 0"), ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"num_return_sequences": 2, "greedy": True}, "need sampling")])
def test_invalid_sampling_values_are_refused(bad, message):
    with pytest.raises(generate.UserError, match=message):
        generate.check_sampling(args(**bad))


def test_cli_refuses_seed_000s_top_p(tiny_spm):
    proc = run_script("generate.py", "--model", tiny_spm[0], "--top-p", "90", check=False)
    assert proc.returncode == 1 and "top_p is a probability and must lie in (0, 1] (got 90.0)" in error_line(proc)


@pytest.mark.parametrize("mode", ["16bit", "nf4", "int8"])
def test_each_load_mode_streams_text(tiny_spm, mode):
    model, tok = generate.load(tiny_spm[0], None, mode)
    if mode != "16bit":
        assert model.is_loaded_in_4bit if mode == "nf4" else model.is_loaded_in_8bit
    ids = generate.prompt_ids(tok, "Once upon a time")
    pieces = list(generate.stream(model, tok, ids, generate.generation_kwargs(args(max_new_tokens=12, greedy=True))))
    assert len(pieces) >= 2 and "".join(pieces).strip()  # several pieces: it streamed, not one final string


def test_base_plus_adapter_unmerged(tiny_spm, tmp_path):
    folder, model, _ = tiny_spm
    make_adapter(model, tmp_path / "adapter")
    proc = run_script("generate.py", "--model", folder, "--adapter", tmp_path / "adapter", "--max-new-tokens", 6,
                      "--greedy", "--prompt", "Hello")
    assert "tokens/s" in proc.stdout and "memory footprint" in proc.stdout
