"""merge_gguf.py: the adapter merged straight into the GGUF equals the two-step path, tensor for tensor."""
import copy

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from conftest import needs_llama_cpp, needs_llama_source
from helpers import error_line, make_adapter, make_tiny_llama, read_gguf, run_script

pytestmark = needs_llama_source  # test_direct_k_quant also needs the build
# general.name / general.finetune come from folder names, which differ between the two paths by design
NAMING_KEYS = {"general.name", "general.basename", "general.finetune"}


def direct(base, ckpts, out, *extra, check=True, env=None):
    return run_script("merge_gguf.py", "--base", base, "--checkpoints-dir", ckpts, "--out", out, *extra,
                      check=check, env=env)


def two_step(base, ckpts, tmp, quant="q8_0", method="streaming"):
    merged, out = tmp / f"merged-{method}", tmp / f"two-step-{method}.{quant}.gguf"
    run_script("merge_lora.py", "--base", base, "--checkpoints-dir", ckpts, "--out", merged, "--method", method)
    run_script("convert_gguf.py", "--model", merged, "--quant", quant, "--out", out, "--log", tmp / "c.log")
    return out


def tensors(path):
    return read_gguf(path)[1]


def assert_same_gguf(a, b):
    (ma, ta), (mb, tb) = read_gguf(a), read_gguf(b)
    assert sorted(ta) == sorted(tb)  # the order follows the shards each path read; llama.cpp looks up by name
    for name in ta:
        assert ta[name].tensor_type == tb[name].tensor_type, name
        assert np.array_equal(ta[name].data, tb[name].data), name
    keys = (set(ma) | set(mb)) - NAMING_KEYS
    assert [k for k in keys if k not in ma or k not in mb or ma[k] != mb[k]] == []


def test_q8_0_is_byte_identical_to_gguf_py():
    import merge_gguf
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 256)).astype(np.float32) * rng.choice([1e-30, 1e-3, 1.0, 1e4], (64, 1))
    x[0] = 0.0  # an all-zero block: d = 0
    x[1, :32] = np.arange(-16, 16) * (1.0 / 127)  # values landing on .5 ties after scaling
    x[2, :32] = np.linspace(-127.5, 127.5, 32)
    x[3, 5] = 65504.0 * 127  # d overflows fp16
    ours = merge_gguf.q8_0(x)
    assert ours.dtype == np.uint8 and ours.shape == (64, 256 // 32 * 34)
    assert np.array_equal(ours, quantize(x, GGMLQuantizationType.Q8_0))


@pytest.mark.parametrize("variant", ["plain", "dora", "resized_vocab", "embedding", "trainable_tokens"])
def test_direct_equals_two_step_spm(tiny_spm, tmp_path, variant):
    base_dir, base_model, tok = tiny_spm
    kwargs = {"plain": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]},
              "dora": {"use_dora": True, "target_modules": ["q_proj", "v_proj", "down_proj"]},
              "resized_vocab": {"modules_to_save": ["embed_tokens", "lm_head"]},
              "embedding": {"target_modules": ["embed_tokens", "q_proj"]},
              "trainable_tokens": {"trainable_token_indices": [2, 7000, 31000, 31999]}}[variant]
    if variant == "resized_vocab":  # a fine-tune that added 3 tokens: embed_tokens and lm_head grow
        base_model = copy.deepcopy(base_model)
        base_model.resize_token_embeddings(base_model.config.vocab_size + 3)
    make_adapter(base_model, tmp_path / "ckpts" / "a", **kwargs)
    out = tmp_path / "direct.q8_0.gguf"
    # a tiny row chunk, so the 32000-row embedding and output matrices are streamed in many pieces
    direct(base_dir, tmp_path / "ckpts", out, env={"LORA_SHIP_ROW_CHUNK_BYTES": "40000"})
    assert_same_gguf(out, two_step(base_dir, tmp_path / "ckpts", tmp_path))
    if variant == "resized_vocab":
        assert tensors(out)["token_embd.weight"].shape[1] == len(tok) + 3  # gguf shapes are reversed


def test_direct_equals_two_step_bpe_bf16_sharded(tmp_path):
    base_dir = tmp_path / "base"
    base_model, _ = make_tiny_llama(base_dir, "bpe", dtype=torch.bfloat16, shard="2MB")
    assert len(list(base_dir.glob("model-*.safetensors"))) > 1
    make_adapter(base_model, tmp_path / "ckpts" / "a", target_modules=["q_proj", "v_proj", "up_proj"],
                 use_rslora=True, modules_to_save=["lm_head"])
    out = tmp_path / "direct.q8_0.gguf"
    # a bf16 base: the two-step path's merged copy is rounded to bf16; the direct merge rounds as it only if asked
    direct(base_dir, tmp_path / "ckpts", out, "--round-to-base-dtype", env={"LORA_SHIP_ROW_CHUNK_BYTES": "100000"})
    assert_same_gguf(out, two_step(base_dir, tmp_path / "ckpts", tmp_path))
    direct(base_dir, tmp_path / "ckpts", tmp_path / "f32-hand-off.q8_0.gguf")
    changed = tensors(tmp_path / "f32-hand-off.q8_0.gguf")
    assert any(not np.array_equal(t.data, changed[name].data) for name, t in tensors(out).items())


def direct_reporting_imports(base, ckpts, out, check=True):
    """merge_gguf.py run as a script, printing at exit whether it imported transformers."""
    import subprocess
    import sys
    from helpers import ROOT, SCRIPTS
    code = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n    print('transformers imported:', 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code, str(SCRIPTS / "merge_gguf.py"), "--base", str(base),
                           "--checkpoints-dir", str(ckpts), "--out", str(out)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)
    assert not check or proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_direct_reads_config_and_bpe_vocab_without_transformers(tmp_path):
    """The converter's AutoConfig and AutoTokenizer are answered from config.json and tokenizer.json (importing
    transformers costs more than the whole merge on small machines). A config.json that Transformers did not
    write goes through Transformers and gives the same GGUF; a tokenizer whose hash the converter does not know
    is retried with Transformers, then refused in one line."""
    import json
    import shutil
    base_model, _ = make_tiny_llama(tmp_path / "base", "bpe")
    make_adapter(base_model, tmp_path / "ckpts" / "a")
    fast = direct_reporting_imports(tmp_path / "base", tmp_path / "ckpts", tmp_path / "fast.gguf")
    assert "transformers imported: False" in fast.stdout

    shutil.copytree(tmp_path / "base", tmp_path / "handmade")
    config = json.loads((tmp_path / "handmade" / "config.json").read_text())
    del config["transformers_version"]
    (tmp_path / "handmade" / "config.json").write_text(json.dumps(config))
    slow = direct_reporting_imports(tmp_path / "handmade", tmp_path / "ckpts", tmp_path / "slow.gguf")
    assert "transformers imported: True" in slow.stdout
    assert_same_gguf(tmp_path / "fast.gguf", tmp_path / "slow.gguf")

    shutil.copytree(tmp_path / "base", tmp_path / "odd")
    tokenizer = json.loads((tmp_path / "odd" / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                  "use_regex": True}  # GPT-2's pre-tokenizer instead of Llama 3's
    (tmp_path / "odd" / "tokenizer.json").write_text(json.dumps(tokenizer))
    odd = direct_reporting_imports(tmp_path / "odd", tmp_path / "ckpts", tmp_path / "odd.gguf", check=False)
    assert odd.returncode == 1 and "retrying with Transformers" in odd.stdout + odd.stderr
    assert "cannot convert this model: BPE pre-tokenizer was not recognized" in error_line(odd)
    assert not (tmp_path / "odd.gguf").exists()


def test_direct_within_one_q8_step_of_the_peft_reference(tiny_spm, tmp_path):
    """PEFT's merge_and_unload + llama.cpp's converter, against ours: every q8_0 value within one step."""
    base_dir, base_model, _ = tiny_spm
    make_adapter(base_model, tmp_path / "ckpts" / "a", target_modules="all-linear")
    out = tmp_path / "direct.q8_0.gguf"
    direct(base_dir, tmp_path / "ckpts", out)
    ours, ref = tensors(out), tensors(two_step(base_dir, tmp_path / "ckpts", tmp_path, method="peft"))
    assert sorted(ours) == sorted(ref)
    for name, t in ours.items():
        a, b = dequantize(t.data, t.tensor_type), dequantize(ref[name].data, ref[name].tensor_type)
        step = np.abs(b).reshape(-1, 32).max(axis=1).repeat(32).reshape(b.shape) / 127 if t.tensor_type.name == "Q8_0" \
            else np.abs(b) * 1e-6
        assert np.all(np.abs(a - b) <= step * 1.01 + 1e-12), name


@needs_llama_cpp
def test_direct_k_quant(tmp_path):
    base_dir = tmp_path / "base"
    base_model, _ = make_tiny_llama(base_dir, "spm", hidden=256)  # k-quants need rows of 256
    make_adapter(base_model, tmp_path / "ckpts" / "a")
    out = tmp_path / "out" / "model.Q4_K_M.gguf"
    direct(base_dir, tmp_path / "ckpts", out, "--quant", "Q4_K_M", "--log", tmp_path / "q.log", "--imatrix-cache",
           tmp_path / "imatrix")
    metadata, ts = read_gguf(out)
    assert metadata["general.file_type"] == 15  # MOSTLY_Q4_K_M
    assert "Q4_K" in {t.tensor_type.name for t in ts.values()}
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # the f16 intermediate is gone


def test_direct_non_finite_names_the_tensor_and_writes_nothing(tiny_spm, tmp_path):
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    st = tmp_path / "ckpts" / "a" / "adapter_model.safetensors"
    t = load_file(st)
    t[next(k for k in t if "layers.1.self_attn.v_proj.lora_B" in k)][0, 0] = float("nan")
    save_file(t, st)
    (tmp_path / "out").mkdir()
    proc = direct(tiny_spm[0], tmp_path / "ckpts", tmp_path / "out" / "m.gguf", check=False)
    assert proc.returncode == 1
    assert "model.layers.1.self_attn.v_proj.weight" in error_line(proc) and "non-finite" in error_line(proc)
    assert list((tmp_path / "out").iterdir()) == []


def test_direct_malformed_config_is_one_line(tiny_spm, tmp_path):
    import shutil
    shutil.copytree(tiny_spm[0], tmp_path / "base")
    (tmp_path / "base" / "config.json").write_text("{not json")
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    proc = direct(tmp_path / "base", tmp_path / "ckpts", tmp_path / "x.gguf", check=False)
    assert proc.returncode == 1 and "config.json is not valid JSON" in error_line(proc)
    assert not (tmp_path / "x.gguf").exists()


def test_direct_refuses_unknown_quant_and_missing_disk(tiny_spm, tmp_path):
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    proc = direct(tiny_spm[0], tmp_path / "ckpts", tmp_path / "x.gguf", "--quant", "q7_x", check=False)
    assert proc.returncode == 1 and "unknown QUANT=q7_x" in error_line(proc)
    proc = direct(tiny_spm[0], tmp_path / "ckpts", tmp_path / "x.gguf", check=False,
                  env={"LORA_SHIP_FAKE_FREE_BYTES": "1000"})
    assert proc.returncode == 1 and "not enough disk space" in error_line(proc)
    assert not (tmp_path / "x.gguf").exists()


@needs_llama_cpp
def test_padded_vocabulary_from_tokenizer_json_loads_and_never_samples_a_pad(tiny_spm, tmp_path):
    """A Llama 2-style base whose embedding was padded (resize_token_embeddings(pad_to_multiple_of=96): 32064
    rows for 32000 tokens) and that ships only tokenizer.json: the converter's tokenizer.json path writes no
    padding tokens, so llama.cpp refused the GGUF (token_embd.weight has wrong shape). The GGUF keeps the rows
    the tokenizer reaches: it loads, serves, and never samples a padding row, even where the HF model's own
    greedy choice is one (its output rows are made to win here)."""
    import shutil
    from helpers import gguf_next_token_logprobs, running_server
    base_dir, base_model, tok = tiny_spm
    model = copy.deepcopy(base_model)
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=96)
    rows = model.get_output_embeddings().weight.shape[0]
    assert rows == 32064 > len(tok)
    prompt = tok("Once upon a time")["input_ids"]
    peft_model = make_adapter(model, tmp_path / "ckpts" / "a", target_modules=["q_proj", "v_proj"])
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    with torch.no_grad():
        best = int(merged(torch.tensor([prompt])).logits[0, -1].argmax())
        for m in (model, merged):  # the padding rows: 3 × the best token's row, so they beat it
            m.get_output_embeddings().weight[len(tok):] = 3 * m.get_output_embeddings().weight[best]
        assert int(merged(torch.tensor([prompt])).logits[0, -1].argmax()) >= len(tok)  # HF would pick a pad
    base = tmp_path / "base"
    model.save_pretrained(base, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base_dir / name).exists():
            shutil.copy2(base_dir / name, base)
    assert not (base / "tokenizer.model").exists()
    out = tmp_path / "padded.f32.gguf"
    proc = direct(base, tmp_path / "ckpts", out, "--quant", "f32")
    assert f"{rows} rows for {len(tok)} tokens" in proc.stdout + proc.stderr
    metadata, ts = read_gguf(out)
    assert len(metadata["tokenizer.ggml.tokens"]) == len(tok)
    assert ts["token_embd.weight"].shape[1] == ts["output.weight"].shape[1] == len(tok)  # gguf shapes reversed
    with running_server(out, tmp_path) as url:
        generated, tops = gguf_next_token_logprobs(url, prompt, 8, 5)
    assert generated[0] == best, (generated, best)  # the best real token, as HF's over the tokenizer's rows
    assert all(t < len(tok) for t in generated) and all(t < len(tok) for top in tops for t in top)
    # the stock converter (convert_gguf.py: the base GGUF, KEEP_MERGED=1) would write a GGUF llama.cpp refuses
    out = tmp_path / "base.f16.gguf"
    proc = run_script("convert_gguf.py", "--model", base, "--quant", "f16", "--out", out, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{rows} rows for {len(tok)} tokens in tokenizer.json" in error_line(proc) and not out.exists()


@needs_llama_cpp
def test_f32_from_a_bf16_base_is_not_rounded_to_bf16(tiny_bpe, tmp_path):
    """A bf16 base merged straight to f32: the merged weights reach the converter in float32, so the GGUF's
    logits are within 5e-4 (relative, every position) of PEFT's fp32 merge; --round-to-base-dtype rounds
    them to bf16 first (the two-step path's bytes) and lands several times further off."""
    from test_families import llama_cpp_logits, random_ids
    base_dir, base_model, tok = tiny_bpe
    # scaling 0.25: the delta about as large as the base weights (the default 2 drowns them, and the logits then
    # differ by 1e-2 between any two fp32 implementations)
    peft_model = make_adapter(base_model.float(), tmp_path / "ckpts" / "a", target_modules="all-linear", lora_alpha=1)
    base_model.to(torch.bfloat16)  # .float() above converted the session's model in place
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    ids = random_ids(tok)[:64]
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0].double().numpy()

    def error(*extra):
        out = tmp_path / f"m{len(extra)}.f32.gguf"
        direct(base_dir, tmp_path / "ckpts", out, "--quant", "f32", *extra)
        ours = llama_cpp_logits(out, ids)[:, :ref.shape[1]]
        return float((np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)).max())

    exact, rounded = error(), error("--round-to-base-dtype")
    print(f"f32 from a bf16 base: max relative logit error {exact:.2e} (float32 hand-off), "
          f"{rounded:.2e} (rounded to bf16 first)")
    assert exact <= 5e-4 and rounded > 3 * exact, (exact, rounded)
