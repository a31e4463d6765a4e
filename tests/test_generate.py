"""Hugging Face generation: each load mode on CPU, real streaming, and refused sampling values."""
import argparse
import json
from pathlib import Path

import pytest

import generate
from conftest import needs_llama_cpp
from helpers import LLAMA_SERVER, error_line, http_json, make_adapter, run_script, running_server


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


@needs_llama_cpp
def test_gguf_through_llama_cpp_python_uses_the_vendored_libllama(tiny_gguf, tmp_path):
    """seed 004's engine on the GGUF: llama-cpp-python loads vendor/llama.cpp's libllama (no second build), and
    its greedy continuation is token for token the one llama-server (the same library) gives."""
    proc = run_script("generate.py", "--model", tiny_gguf, "--greedy", "--max-new-tokens", "12", "--stats-json",
                      tmp_path / "stats.json", "--prompt", "Once upon a time")
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert Path(stats["libllama"]).resolve() == (LLAMA_SERVER.parent / "libllama.so").resolve()
    assert stats["tokens"] > 0 and proc.stdout.strip()
    # the tiny random model's next-token distribution is nearly flat, so greedy strings could part on a near
    # tie: compare the distributions instead (top-20 log-probabilities after the same prompt)
    import numpy as np
    generate.load_gguf(tiny_gguf, 0, LLAMA_SERVER.parent)  # points llama_cpp at the vendored libllama
    from llama_cpp import Llama
    llm = Llama(str(tiny_gguf), n_ctx=512, logits_all=True, verbose=False)
    ids = llm.tokenize(b"Once upon a time")
    llm.eval(ids)
    logits = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    mine = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    with running_server(tiny_gguf, tmp_path) as url:
        _, out = http_json(url + "/completion", {"prompt": ids, "n_predict": 1, "n_probs": 20, "temperature": 0})
    theirs = {t["id"]: t["logprob"] for t in out["completion_probabilities"][0]["top_logprobs"]}
    assert len(theirs) == 20
    assert max(abs(mine[i] - lp) for i, lp in theirs.items()) < 2e-3
    assert sorted(theirs, key=theirs.get)[-1] == int(np.argmax(mine))


@needs_llama_cpp
def test_gguf_refuses_hf_only_options(tiny_gguf):
    proc = run_script("generate.py", "--model", tiny_gguf, "--load", "nf4", check=False)
    assert proc.returncode == 1 and "a GGUF is already quantized" in error_line(proc)
    proc = run_script("generate.py", "--model", tiny_gguf, "--no-repeat-ngram-size", "3", check=False)
    assert proc.returncode == 1 and "no llama.cpp equivalent" in error_line(proc)


@needs_llama_cpp
def test_compare_runs_each_model_and_tabulates(tiny_spm, tiny_gguf):
    proc = run_script("compare.py", str(tiny_spm[0]), f"{tiny_spm[0]}:int8", str(tiny_gguf), "--prompt", "Hello",
                      "--", "--greedy", "--max-new-tokens", "6")
    rows = [l for l in proc.stdout.splitlines() if l.startswith("| ") and "tokens/s" not in l]
    assert [r.split("|")[2].strip() for r in rows] == ["16bit", "int8", "gguf (llama-cpp-python)"]
    assert all("failed" not in r for r in rows)
    proc = run_script("compare.py", "no/such/model", check=False)
    assert proc.returncode == 1 and "model no/such/model does not exist" in error_line(proc)
