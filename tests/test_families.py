"""Every family through every stage: a tiny random Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Phi-3 with a LoRA on all
its linear layers, merged both ways into GGUF, against PEFT's own merge of the same adapter.
The same adapter exported unmerged (make adapters) and applied by llama.cpp to the f32 base gives the same logits.

- f32 GGUF logits (llama.cpp through llama-cpp-python, f32 KV cache) against PEFT's merged fp32 model on the
  same ids: relative error <= 1e-3 at every position, top-1 agreement >= 99%;
- the direct merge (merge_gguf.py) and the two-step one (merge_lora.py + convert_gguf.py) give the same GGUF;
- q8_0 within one quantization step of the f32 GGUF in every block;
- served: /apply-template renders the family's chat template as Transformers does, and /tokenize gives the HF
  tokenizer's ids (and llama.cpp's own test vectors) on the vocab's test strings.
The Llama 2 and Llama 3 path is covered by test_merge*.py and test_pipeline.py.
"""
import copy
import json
import os

import numpy as np
import pytest
import torch

from conftest import needs_llama_cpp, needs_llama_source
from families import FAMILIES, make_family_model
from helpers import LLAMA_SERVER, http_json, make_adapter, run_script, running_server, vocab_test_cases
from test_merge_gguf import assert_same_gguf, tensors

pytestmark = needs_llama_source  # the tests through llama.cpp's tools or libllama also need the build
CHAT = [{"role": "user", "content": "Tell me a fairy tale about a frog."},
        {"role": "assistant", "content": "Once upon a time a frog lived in a well."},
        {"role": "user", "content": "And then?"}]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(family, tmp, base folder, tokenizer, PEFT's merged fp32 model, checkpoints folder)."""
    fam = FAMILIES[request.param]
    tmp = tmp_path_factory.mktemp(fam.name)
    base_model, tok = make_family_model(fam, tmp / "base")
    peft_model = make_adapter(base_model, tmp / "ckpts" / "adapter", target_modules="all-linear", r=8,
                              lora_alpha=16)
    merged = copy.deepcopy(peft_model).merge_and_unload().eval()
    merged.config._attn_implementation = "eager"  # Gemma 2's soft-capping is only in the eager attention
    return fam, tmp, tmp / "base", tok, merged, tmp / "ckpts"


def merge_gguf(base, ckpts, out, quant):
    """merge_gguf.py with the embedding streamed in chunks of 400 rows (the default is 128 MiB of them)."""
    run_script("merge_gguf.py", "--base", base, "--checkpoints-dir", ckpts, "--out", out, "--quant", quant,
               "--log", out.with_suffix(".log"), env={"LORA_SHIP_ROW_CHUNK_BYTES": str(400 * 64 * 4)})
    return out


def made(family, what: str):
    """The family's direct f32 or q8_0 GGUF, or its merged HF folder ("merged"), made the first time a test asks."""
    fam, tmp, base, tok, merged, ckpts = family
    path = tmp / {"f32": "direct.f32.gguf", "q8_0": "direct.q8_0.gguf", "merged": "merged"}[what]
    if not path.exists():
        if what == "merged":
            run_script("merge_lora.py", "--base", base, "--checkpoints-dir", ckpts, "--out", path)
        else:
            merge_gguf(base, ckpts, path, what)
    return path


def llama_cpp_logits(gguf, ids: list[int], lora=None) -> np.ndarray:
    """Logits at every position, from llama.cpp's own library with an f32 KV cache (no f16 rounding), with the
    GGUF adapter `lora` applied unmerged if given."""
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(LLAMA_SERVER.parent))
    from llama_cpp import Llama
    llm = Llama(str(gguf), n_ctx=128, n_batch=128, logits_all=True, type_k=0, type_v=0, verbose=False,
                lora_path=str(lora) if lora else None)
    try:
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)], dtype=np.float64)
    finally:
        llm.close()


def random_ids(tok) -> list[int]:
    ids = torch.randint(0, len(tok), (96,), generator=torch.Generator().manual_seed(1)).tolist()
    return [tok.bos_token_id, *ids] if tok.bos_token_id is not None else ids


def hf_logits(model, ids: list[int], n_vocab: int) -> np.ndarray:
    """A Transformers model's logits at every position, over the tokenizer's n_vocab tokens (float64)."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, :, :n_vocab].double().numpy()


def assert_logits_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    """Relative error <= 1e-3 at every position, top-1 agreement >= 99%."""
    rel = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    top1 = float(np.mean(ours.argmax(1) == ref.argmax(1)))
    print(f"{what}: max relative error {rel.max():.2e}, top-1 agreement {top1:.3f} over {len(ref)} positions")
    assert rel.max() <= 1e-3, rel.max()
    assert top1 >= 0.99


@needs_llama_cpp
def test_f32_gguf_logits_equal_peft_merge(family):
    fam, tmp, base, tok, merged, ckpts = family
    gguf = made(family, "f32")
    ids = random_ids(tok)
    ref = hf_logits(merged, ids, len(tok))
    ours = llama_cpp_logits(gguf, ids)[:, :len(tok)]
    assert_logits_close(ours, ref, fam.name)
    # and the adapter mattered: the base's logits are far from these
    from transformers import AutoModelForCausalLM
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    plain = hf_logits(base_model, ids, len(tok))
    assert (np.linalg.norm(plain - ref, axis=1) / np.linalg.norm(ref, axis=1)).min() > 1e-2


@needs_llama_cpp
def test_unmerged_adapter_logits_equal_peft_merge(family):
    """make adapters on the family: the base as f32 GGUF plus the all-linear adapter exported unmerged
    (export_adapters.py: the family's tensor names, Phi-3's fused qkv_proj and gate_up_proj) gives PEFT's
    merged logits."""
    fam, tmp, base, tok, merged, ckpts = family
    base_gguf, adapters = tmp / "base.f32.gguf", tmp / "adapters"
    run_script("convert_gguf.py", "--model", base, "--quant", "f32", "--out", base_gguf, "--log", tmp / "base.log")
    run_script("export_adapters.py", "--base", base, "--checkpoints-dir", ckpts, "--out-dir", adapters,
               "--outtype", "f32", "--log", tmp / "export.log")
    ids = random_ids(tok)
    ref = hf_logits(merged, ids, len(tok))
    assert_logits_close(llama_cpp_logits(base_gguf, ids, lora=adapters / "adapter.gguf")[:, :len(tok)], ref,
                        f"{fam.name} unmerged")


def test_two_step_and_q8_0(family):
    """merge_lora.py + convert_gguf.py gives the direct merge's GGUF; q8_0 is within one step of f32."""
    fam, tmp, base, tok, merged, ckpts = family
    f32 = made(family, "f32")
    run_script("convert_gguf.py", "--model", made(family, "merged"), "--quant", "f32", "--out", tmp / "two-step.f32.gguf",
               "--log", tmp / "convert.log")
    assert_same_gguf(f32, tmp / "two-step.f32.gguf")
    q8 = made(family, "q8_0")
    from gguf.quants import dequantize
    exact, quantized = tensors(f32), tensors(q8)
    assert sorted(exact) == sorted(quantized)
    for name, t in quantized.items():
        if t.tensor_type.name != "Q8_0":
            continue
        ref = np.asarray(exact[name].data, dtype=np.float32).reshape(-1, 32)
        step = np.abs(ref).max(axis=1, keepdims=True) / 127
        assert np.all(np.abs(dequantize(t.data, t.tensor_type).reshape(-1, 32) - ref) <= step * 1.01 + 1e-12), name
    assert any(t.tensor_type.name == "Q8_0" for t in quantized.values())


@needs_llama_cpp
def test_served_template_and_tokenizer(family, tmp_path):
    fam, tmp, base, tok, merged, ckpts = family
    q8 = made(family, "q8_0")
    hf_prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    adds_bos = tok.bos_token_id is not None and tok("a")["input_ids"][0] == tok.bos_token_id
    with running_server(q8, tmp_path) as url:
        _, rendered = http_json(url + "/apply-template", {"messages": CHAT})
        # the server leaves out a leading BOS text where tokenizing the prompt adds BOS itself
        assert rendered["prompt"] == (hf_prompt.removeprefix(tok.bos_token) if adds_bos else hf_prompt)
        if fam.vocab_test is None:
            return
        _, served = http_json(url + "/tokenize", {"content": rendered["prompt"], "add_special": True,
                                                   "parse_special": True})
        assert served["tokens"] == tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
        cases = vocab_test_cases(fam.vocab_test)
        assert len(cases) > 30
        spm = None
        if (base / "tokenizer.model").exists():  # the SentencePiece file the converter reads, where it ships
            from sentencepiece import SentencePieceProcessor
            spm = SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
        for text, want in cases:
            hf = tok.encode(text, add_special_tokens=False)
            _, served = http_json(url + "/tokenize", {"content": text})
            assert hf == want, (fam.vocab_test, text)  # the rebuilt tokenizer is the real one
            assert spm is None or spm.encode(text) == want, (fam.vocab_test, text)
            assert served["tokens"] == hf, (fam.vocab_test, text)


def test_merged_config_is_the_base_config(family):
    """The merged HF model keeps the family's class and every config quirk (tied embeddings, soft-capping)."""
    fam, tmp, base, tok, merged, ckpts = family
    cfg = json.loads((made(family, "merged") / "config.json").read_text())
    assert cfg["architectures"] == [type(merged).__name__]
    assert cfg == json.loads((base / "config.json").read_text())


def test_train_follows_the_family(family):
    """`make train`'s defaults on each family: PEFT's target modules for the architecture (Phi-3 has none there:
    its attention projections, fused qkv_proj and o_proj), the family's chat template; the result merges."""
    from test_train import some_tales, train, write_tales
    fam, tmp, base, tok, merged, ckpts = family
    data = write_tales(tmp / "tales.jsonl", some_tales(4))
    out = tmp / "trained" / "run"
    proc = train(base, data, out, "--steps", "2", "--recipe", "cpu")
    targets = set(json.loads((out / "adapter_config.json").read_text())["target_modules"])
    assert targets == ({"qkv_proj", "o_proj"} if fam.name == "phi3" else {"q_proj", "v_proj"}), targets
    assert f"LoRA on {','.join(sorted(targets))}" in proc.stdout.replace("v_proj,q_proj", "q_proj,v_proj")
    saved = json.loads((out / "tokenizer_config.json").read_text()).get("chat_template") or (
        out / "chat_template.jinja").read_text()
    assert saved == tok.chat_template
    merge_gguf(base, out.parent, tmp / "trained.q8_0.gguf", "q8_0")


def test_slow_tokenizer_only_base(tmp_path):
    """A base that ships only tokenizer.model (no tokenizer.json): Transformers converts it (protobuf and
    sentencepiece must agree), training and the merge into GGUF both work."""
    from test_train import some_tales, train, write_tales
    make_family_model(FAMILIES["mistral"], tmp_path / "base")
    (tmp_path / "base" / "tokenizer.json").unlink()
    config = json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizer"
    (tmp_path / "base" / "tokenizer_config.json").write_text(json.dumps(config))
    data = write_tales(tmp_path / "tales.jsonl", some_tales(2))
    train(tmp_path / "base", data, tmp_path / "ckpts" / "run", "--steps", "1", "--recipe", "cpu")
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the merge takes the base's slow-only tokenizer
        (tmp_path / "ckpts" / "run" / name).unlink()
    merge_gguf(tmp_path / "base", tmp_path / "ckpts", tmp_path / "m.q8_0.gguf", "q8_0")


@pytest.mark.parametrize("name", ["gemma2", "phi3", "gemma3"])
def test_base_without_tokenizer_model(name, tmp_path):
    """Gemma 2 and Phi-3 ship tokenizer.json too, but llama.cpp's converter for them reads only tokenizer.model:
    without it `make check`, the direct merge and the plain converter each stop with one line, before merging
    anything. Gemma 3's converter falls back to tokenizer.json: its check passes."""
    from lib.merge import SENTENCEPIECE_ONLY
    from test_merge import check, expect_error
    fam = FAMILIES[name]
    model, _ = make_family_model(fam, tmp_path / "base")
    make_adapter(model, tmp_path / "ckpts" / "a", target_modules=["qkv_proj"] if name == "phi3" else ["q_proj"])
    (tmp_path / "base" / "tokenizer.model").unlink()
    arch = model.config.architectures[0]
    proc = check(tmp_path / "base", tmp_path / "ckpts")
    if name == "gemma3":
        assert arch not in SENTENCEPIECE_ONLY and proc.returncode == 0, proc.stderr
        return
    missing = str(tmp_path / "base" / "tokenizer.model")
    expect_error(proc, missing, "is missing", arch)
    out = tmp_path / "m.q8_0.gguf"
    expect_error(run_script("merge_gguf.py", "--base", tmp_path / "base", "--checkpoints-dir", tmp_path / "ckpts",
                            "--out", out, check=False), missing, "is missing", out=out)
    out = tmp_path / "base.f16.gguf"
    expect_error(run_script("convert_gguf.py", "--model", tmp_path / "base", "--quant", "f16", "--out", out,
                            check=False), missing, "is missing", out=out)


def test_sentencepiece_only_architectures_are_the_pinned_converters():
    """Each architecture the check holds to tokenizer.model has a converter class in the pinned llama.cpp whose
    set_vocab reads tokenizer.model (the list was read off conversion/*.py); Gemma 3's and Llama's fall back."""
    import subprocess
    import sys
    from helpers import ROOT
    from lib.merge import SENTENCEPIECE_ONLY
    probe = ("import sys, inspect, json; sys.path[:0] = ['gguf-py', '.']; import conversion\n"
             "src = {a: inspect.getsource(conversion.get_model_class(a).set_vocab) for a in sys.argv[1:]}\n"
             "print(json.dumps(src))")
    archs = sorted(SENTENCEPIECE_ONLY) + ["Gemma3ForCausalLM", "LlamaForCausalLM"]
    proc = subprocess.run([sys.executable, "-c", probe, *archs], cwd=ROOT / "vendor" / "llama.cpp",
                          capture_output=True, text=True, check=True)
    sources = json.loads(proc.stdout.strip().splitlines()[-1])
    for arch, src in sources.items():
        reads_spm = "_vocab_sentencepiece()" in src or "'tokenizer.model'" in src
        guarded = "is_file():\n            self._set_vocab_sentencepiece()" in src or "except FileNotFoundError" in src
        assert reads_spm and (guarded == (arch not in SENTENCEPIECE_ONLY)), arch


# one family per tokenizer kind: Llama 2 SentencePiece (Mistral; Qwen3 and the Gemmas share their code paths
# with these three), Qwen2 BPE, Phi-3's SentencePiece with its special tokens; Llama 3 runs in test_make.py
@needs_llama_cpp
@pytest.mark.parametrize("family", ["mistral", "qwen2", "phi3"], indirect=True)
def test_compare_and_eval_run_on_the_family(family):
    """`make compare` (HF 16-bit, nf4 and the GGUF through llama-cpp-python) and `make eval` (every form) on
    a family of each tokenizer kind. The unmerged adapter and the merged model agree (the merge is right); the
    base does not."""
    fam, tmp, base, tok, merged, ckpts = family
    merged_dir, q8 = made(family, "merged"), made(family, "q8_0")
    proc = run_script("compare.py", merged_dir, f"{merged_dir}:nf4", q8, "--prompt", "Once upon a time",
                      "--", "--greedy", "--max-new-tokens", "4")
    rows = [line for line in proc.stdout.splitlines() if line.startswith(f"| {tmp}")]
    assert len(rows) == 3 and not any("failed" in row for row in rows), proc.stdout[-2000:]
    from helpers import ROOT
    run_script("eval_quality.py", "--base", base, "--checkpoints-dir", ckpts, "--dataset",
               ROOT / "data" / "grimm_stories.jsonl", "--out", tmp / "eval", "--ctx", "64", "--max-tokens", "512")
    report = json.loads((tmp / "eval" / "quality.json").read_text())
    assert len(report) == 8 and all(r["ppl"] > 1 for r in report.values())
    assert all(r["tokens"] >= 200 for r in report.values() if r["engine"] == "transformers")
    unmerged, base_row = report["HF base + adapter (unmerged)"], report["HF base"]
    assert unmerged["kl"] < 1e-3 and base_row["kl"] > 100 * unmerged["kl"], (unmerged, base_row)
    assert report["GGUF q8_0"]["kl"] < report["GGUF Q4_K_M"]["kl"]
