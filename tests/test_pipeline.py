"""Merge -> q8_0 GGUF -> server, on tiny random Llamas with the real Llama 2 and Llama 3 tokenizers."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors.torch import load_file

from conftest import needs_llama_cpp
from helpers import error_line, http_json, make_adapter, make_tiny_llama, read_gguf, run_script, running_server

pytestmark = needs_llama_cpp

# convert_hf_to_gguf renames tensors; these are the ones the LoRA touched, and Llama's q/k row permutation
GGUF_NAMES = {"model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
              "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight"}


@pytest.mark.parametrize("tokenizer", ["spm", "bpe"])
def test_merge_quantize_serve(request, tmp_path, tokenizer):
    base_dir, base_model, tok = request.getfixturevalue(f"tiny_{tokenizer}")
    make_adapter(base_model, tmp_path / "ckpts" / "grimm", target_modules=["q_proj", "v_proj", "o_proj"])
    merged = tmp_path / "merged"
    run_script("merge_lora.py", "--base", base_dir, "--checkpoints-dir", tmp_path / "ckpts", "--out", merged)
    gguf = tmp_path / "model.q8_0.gguf"
    run_script("convert_gguf.py", "--model", merged, "--quant", "q8_0", "--out", gguf, "--log", tmp_path / "c.log")

    metadata, tensors = read_gguf(gguf)
    assert metadata["general.architecture"] == "llama"
    assert metadata["tokenizer.ggml.model"] == ("llama" if tokenizer == "spm" else "gpt2")
    assert len(metadata["tokenizer.ggml.tokens"]) == len(tok)
    assert metadata["general.file_type"] == 7  # MOSTLY_Q8_0

    # the merged (not the base) weights are what went into the GGUF, to within one q8_0 step
    weights = load_file(merged / "model.safetensors")
    for i in range(2):
        for hf_name, gguf_name in GGUF_NAMES.items():
            hf = weights[hf_name.format(i=i)].float().numpy()
            t = tensors[gguf_name.format(i=i)]
            assert t.tensor_type.name == "Q8_0"
            deq = dequantize(t.data, t.tensor_type).reshape(hf.shape)
            step = np.abs(hf).reshape(-1, 32).max(axis=1).repeat(32).reshape(hf.shape) / 127
            # q8_0: x ~ d * round(x / d), d = amax / 127 stored as fp16 (its rounding adds up to ~6% of d)
            assert np.all(np.abs(deq - hf) <= step * 0.57), gguf_name.format(i=i)
            base_w = base_model.state_dict()[hf_name.format(i=i)].float().numpy()
            assert np.abs(deq - base_w).max() > 10 * step.max()  # the LoRA delta is visible through q8_0

    with running_server(gguf, tmp_path) as url:
        assert http_json(url + "/health")[1]["status"] == "ok"
        status, out = http_json(url + "/completion", {"prompt": "Once upon a time", "n_predict": 8})
        assert status == 200 and out["tokens_predicted"] > 0 and isinstance(out["content"], str)
        status, out = http_json(url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Tell me a fairy tale"}], "max_tokens": 8})
        assert status == 200 and out["choices"][0]["message"]["role"] == "assistant"
        assert out["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("quant", ["f16", "Q4_K_M"])
def test_other_quant_types(tmp_path, quant):
    # k-quants work on rows of 256 values: a narrower model would silently fall back to other types
    base_dir = tmp_path / "base"
    base_model, _ = make_tiny_llama(base_dir, "spm", hidden=256)
    make_adapter(base_model, tmp_path / "ckpts" / "a")
    run_script("merge_lora.py", "--base", base_dir, "--checkpoints-dir", tmp_path / "ckpts", "--out", tmp_path / "m")
    out = tmp_path / f"model.{quant}.gguf"
    run_script("convert_gguf.py", "--model", tmp_path / "m", "--quant", quant, "--out", out, "--log", tmp_path / "c.log",
               "--imatrix-cache", tmp_path / "imatrix")
    metadata, tensors = read_gguf(out)
    types = {t.tensor_type.name for t in tensors.values()}
    assert ("F16" in types) if quant == "f16" else ("Q4_K" in types)
    # k-quants with an importance matrix: over the general text, as this adapter records no training data
    dataset = metadata.get("quantize.imatrix.dataset")
    assert (dataset is None) if quant == "f16" else Path(dataset).name.startswith("calibration-general-")
    assert metadata["general.file_type"] == (1 if quant == "f16" else 15)  # MOSTLY_F16 / Q4_K_M
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no intermediate left behind


def test_unknown_quant_type(tiny_spm, tmp_path):
    proc = run_script("convert_gguf.py", "--model", tiny_spm[0], "--quant", "q7_x", "--out", tmp_path / "x.gguf",
                      check=False)
    assert proc.returncode == 1 and "unknown QUANT=q7_x" in error_line(proc)
    assert not (tmp_path / "x.gguf").exists()


def test_conversion_disk_check(tiny_spm, tmp_path):
    proc = run_script("convert_gguf.py", "--model", tiny_spm[0], "--out", tmp_path / "x.gguf", check=False,
                      env={"LORA_SHIP_FAKE_FREE_BYTES": "1000"})
    assert proc.returncode == 1 and "not enough disk space" in error_line(proc)
    assert list(tmp_path.iterdir()) == []


def test_merged_model_keeps_generation_config(tiny_bpe, tmp_path):
    base_dir, base_model, _ = tiny_bpe
    base_model.generation_config.save_pretrained(base_dir)
    make_adapter(base_model, tmp_path / "ckpts" / "a")
    run_script("merge_lora.py", "--base", base_dir, "--checkpoints-dir", tmp_path / "ckpts", "--out", tmp_path / "m")
    assert json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"] == \
        base_model.generation_config.eos_token_id
    assert load_file(tmp_path / "m" / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16
