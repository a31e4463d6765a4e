"""The streaming merge equals PEFT's merge_and_unload, and refuses what it cannot merge right."""
import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import error_line, make_adapter, make_tiny_llama, run_script


def merged_by_peft(peft_model):
    return copy.deepcopy(peft_model).merge_and_unload()


def assert_same_logits(folder, reference, atol):
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, merged.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = merged(ids).logits
        ref = reference.float()(ids).logits
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() <= atol, (ours - ref).abs().max().item()


def merge(base, ckpt_dir, out, *extra, check=True, env=None):
    return run_script("merge_lora.py", "--base", base, "--checkpoints-dir", ckpt_dir, "--out", out, *extra,
                      check=check, env=env)


@pytest.mark.parametrize("variant", ["plain", "rslora_patterns", "dora", "modules_to_save", "embedding",
                                     "all_linear"])
def test_streaming_merge_equals_peft(tiny_spm, tmp_path, variant):
    base_dir, base_model, _ = tiny_spm
    kwargs = {
        "plain": {},
        "rslora_patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3},
                            "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "dora": {"use_dora": True, "target_modules": ["q_proj", "o_proj", "up_proj"]},
        "modules_to_save": {"modules_to_save": ["lm_head"]},
        "embedding": {"target_modules": ["embed_tokens", "k_proj"]},
        "all_linear": {"target_modules": "all-linear", "r": 8, "lora_alpha": 16},
    }[variant]
    ckpts = tmp_path / "checkpoints"
    peft_model = make_adapter(base_model, ckpts / "adapter", **kwargs)
    merge(base_dir, ckpts, tmp_path / "merged")
    assert_same_logits(tmp_path / "merged", merged_by_peft(peft_model), atol=1e-4)
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["method"] == "streaming" and info["checkpoint"].endswith("adapter")
    # the delta really changed the model: the merged logits differ from the base's
    ids = torch.arange(16).unsqueeze(0)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
        assert (merged(ids).logits - base_model(ids).logits).abs().max() > 1e-3


def test_bf16_base_sharded_and_peft_method_agree(tmp_path):
    """A sharded bf16 base: streaming merge rounds once; PEFT's path (--method peft) is within 1 bf16 ulp."""
    base_dir = tmp_path / "base"
    base_model, _ = make_tiny_llama(base_dir, "spm", dtype=torch.bfloat16, shard="1MB")
    assert (base_dir / "model.safetensors.index.json").exists()
    make_adapter(base_model, tmp_path / "ckpts" / "a", r=4, lora_alpha=8)
    merge(base_dir, tmp_path / "ckpts", tmp_path / "ours")
    merge(base_dir, tmp_path / "ckpts", tmp_path / "peft", "--method", "peft")
    ours = {k: v for f in sorted((tmp_path / "ours").glob("*.safetensors")) for k, v in load_file(f).items()}
    ref = {k: v for f in sorted((tmp_path / "peft").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert ours.keys() == ref.keys()
    for key in ours:
        assert ours[key].dtype == torch.bfloat16
        diff = (ours[key].float() - ref[key].float()).abs()
        ulp = ref[key].float().abs() * 2 ** -7 + 1e-30
        assert (diff <= ulp).all(), key


def test_resized_vocabulary_with_modules_to_save(tiny_spm, tmp_path):
    """A trained embed_tokens + lm_head with 8 new tokens: the merged config and tensors take the new size."""
    base_dir, base_model, _ = tiny_spm
    grown = copy.deepcopy(base_model)
    grown.resize_token_embeddings(base_model.config.vocab_size + 8)
    peft_model = make_adapter(grown, tmp_path / "ckpts" / "a", modules_to_save=["embed_tokens", "lm_head"])
    merge(base_dir, tmp_path / "ckpts", tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["vocab_size"] == base_model.config.vocab_size + 8
    assert_same_logits(tmp_path / "merged", merged_by_peft(peft_model), atol=1e-4)


@pytest.mark.parametrize("layout", ["modules_to_save", "embedding_lora"])
def test_resized_vocabulary_as_peft_saves_embedding_layers(tiny_spm, tmp_path, layout):
    """PEFT 0.21's save_pretrained(save_embedding_layers=True), what it does by itself when the vocabulary grew:
    each modules_to_save layer under three keys (X.weight, X.modules_to_save.weight, X.original_module.weight);
    with LoRA on the embedding layers, X.base_layer.weight."""
    from safetensors import safe_open
    base_dir, base_model, _ = tiny_spm
    grown = copy.deepcopy(base_model)
    grown.resize_token_embeddings(base_model.config.vocab_size + 8)
    kwargs = {"modules_to_save": {"modules_to_save": ["embed_tokens", "lm_head"]},
              "embedding_lora": {"target_modules": ["embed_tokens", "q_proj", "lm_head"]}}[layout]
    peft_model = make_adapter(grown, tmp_path / "ckpts" / "a", save_kwargs={"save_embedding_layers": True}, **kwargs)
    with safe_open(tmp_path / "ckpts" / "a" / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    marker = "lm_head.original_module.weight" if layout == "modules_to_save" else "lm_head.base_layer.weight"
    assert f"base_model.model.{marker}" in keys
    merge(base_dir, tmp_path / "ckpts", tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["vocab_size"] == len(grown.lm_head.weight)
    assert_same_logits(tmp_path / "merged", merged_by_peft(peft_model), atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_tokens(tmp_path, tie):
    """PEFT's trainable tokens (new special tokens trained without the whole embedding): those rows replaced,
    the output layer too where it is tied to the embedding."""
    base_dir = tmp_path / "base"
    base_model, tok = make_tiny_llama(base_dir, "spm", tie=tie)
    ids = [3, 17, len(tok) - 1]
    peft_model = make_adapter(base_model, tmp_path / "ckpts" / "a", trainable_token_indices=ids)
    merge(base_dir, tmp_path / "ckpts", tmp_path / "merged")
    assert_same_logits(tmp_path / "merged", merged_by_peft(peft_model), atol=1e-4)
    merged = load_file(tmp_path / "merged" / "model.safetensors")["model.embed_tokens.weight"]
    changed = (merged != base_model.model.embed_tokens.weight.detach()).any(dim=1).nonzero().flatten().tolist()
    assert changed == ids


@pytest.mark.parametrize("layout", ["adapter_bin", "regex_targets", "layers_to_transform", "bin_base"])
def test_other_file_layouts(tiny_spm, tmp_path, layout):
    """adapter_model.bin (PyTorch pickle, read with weights_only), target_modules as a regex string,
    layers_to_transform, and a base that ships only pytorch_model-*.bin shards (older Llama 2 / Mistral)."""
    base_dir, base_model, tok = tiny_spm
    kwargs = {"regex_targets": {"target_modules": r".*\.(k|o)_proj"},
              "layers_to_transform": {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]}}
    save = {"safe_serialization": False} if layout == "adapter_bin" else None
    peft_model = make_adapter(base_model, tmp_path / "ckpts" / "a", save_kwargs=save, **kwargs.get(layout, {}))
    if layout == "adapter_bin":
        assert sorted(p.name for p in (tmp_path / "ckpts" / "a").glob("adapter_model.*")) == ["adapter_model.bin"]
    if layout == "bin_base":
        base_dir = tmp_path / "bin-base"
        base_model.save_pretrained(base_dir, safe_serialization=False, max_shard_size="2MB")
        tok.save_pretrained(base_dir)
        assert len(list(base_dir.glob("pytorch_model-*.bin"))) > 1 and not list(base_dir.glob("*.safetensors"))
    merge(base_dir, tmp_path / "ckpts", tmp_path / "merged")
    assert_same_logits(tmp_path / "merged", merged_by_peft(peft_model), atol=1e-4)


def test_trainer_output_folder_uses_its_latest_checkpoint(tiny_spm, tmp_path):
    """A Trainer's output_dir dropped in whole: its one checkpoint-N, or the highest step of several (said)."""
    base_dir, base_model, _ = tiny_spm
    run = tmp_path / "ckpts" / "trainer_run"
    first = make_adapter(base_model, run / "checkpoint-500")
    (run / "checkpoint-500" / "trainer_state.json").write_text("{}")
    merge(base_dir, tmp_path / "ckpts", tmp_path / "one")
    assert_same_logits(tmp_path / "one", merged_by_peft(first), atol=1e-4)
    make_adapter(base_model, run / "checkpoint-900", seed=5)
    latest = make_adapter(base_model, run / "checkpoint-1000", seed=9)
    proc = merge(base_dir, tmp_path / "ckpts", tmp_path / "latest")
    assert "3 training checkpoints" in proc.stderr and "using the latest, checkpoint-1000" in proc.stderr
    assert_same_logits(tmp_path / "latest", merged_by_peft(latest), atol=1e-4)
    merge(base_dir, tmp_path / "ckpts", tmp_path / "chosen", "--checkpoint", "trainer_run/checkpoint-500")
    assert_same_logits(tmp_path / "chosen", merged_by_peft(first), atol=1e-4)


def test_trainer_checkpoint_folder_is_accepted(tiny_spm, tmp_path):
    base_dir, base_model, _ = tiny_spm
    ckpt = tmp_path / "ckpts" / "checkpoint-500"
    peft_model = make_adapter(base_model, ckpt)
    for extra in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"):
        (ckpt / extra).write_bytes(b"\0" * 16)
    merge(base_dir, tmp_path / "ckpts", tmp_path / "merged")
    assert_same_logits(tmp_path / "merged", merged_by_peft(peft_model), atol=1e-4)


def test_checkpoint_tokenizer_and_chat_template_win(tiny_spm, tmp_path):
    base_dir, base_model, tok = tiny_spm
    ckpt = tmp_path / "ckpts" / "a"
    make_adapter(base_model, ckpt)
    tok2 = copy.deepcopy(tok)
    tok2.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok2.save_pretrained(ckpt)
    merge(base_dir, tmp_path / "ckpts", tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text()).get("chat_template") or (
        tmp_path / "merged" / "chat_template.jinja").read_text()
    assert saved == tok2.chat_template


# ---- bad input: one clear line, non-zero exit, no output left behind ----

def expect_error(proc, *words, out=None):
    assert proc.returncode != 0
    line = error_line(proc)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for w in words:
        assert w in line, line
    if out is not None:
        assert not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_missing_checkpoint_folder(tiny_spm, tmp_path):
    out = tmp_path / "merged"
    expect_error(merge(tiny_spm[0], tmp_path / "nope", out, check=False), "does not exist", out=out)


def test_no_checkpoint(tiny_spm, tmp_path):
    (tmp_path / "ckpts").mkdir()
    (tmp_path / "ckpts" / "README.md").write_text("drop adapters here")
    out = tmp_path / "merged"
    expect_error(merge(tiny_spm[0], tmp_path / "ckpts", out, check=False), "no checkpoint in", out=out)


def test_empty_checkpoint_folder(tiny_spm, tmp_path):
    (tmp_path / "ckpts" / "mine").mkdir(parents=True)
    out = tmp_path / "merged"
    expect_error(merge(tiny_spm[0], tmp_path / "ckpts", out, check=False), "mine", "is empty", out=out)


def test_several_checkpoints_need_a_choice(tiny_spm, tmp_path):
    base_dir, base_model, _ = tiny_spm
    make_adapter(base_model, tmp_path / "ckpts" / "first")
    peft_b = make_adapter(base_model, tmp_path / "ckpts" / "second", seed=7)
    out = tmp_path / "merged"
    expect_error(merge(base_dir, tmp_path / "ckpts", out, check=False), "first", "second", "CHECKPOINT=", out=out)
    merge(base_dir, tmp_path / "ckpts", out, "--checkpoint", "second")
    assert_same_logits(out, merged_by_peft(peft_b), atol=1e-4)


def test_adapter_for_another_base_names_both(tiny_spm, tmp_path):
    other_dir = tmp_path / "other"
    other, _ = make_tiny_llama(other_dir, "spm", hidden=32)
    make_adapter(other, tmp_path / "ckpts" / "a")
    cfg_path = tmp_path / "ckpts" / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "someone/other-model"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    expect_error(merge(tiny_spm[0], tmp_path / "ckpts", out, check=False), "someone/other-model",
                 str(tiny_spm[0]), out=out)


def test_corrupt_safetensors(tiny_spm, tmp_path):
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    st = tmp_path / "ckpts" / "a" / "adapter_model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    out = tmp_path / "merged"
    expect_error(merge(tiny_spm[0], tmp_path / "ckpts", out, check=False), "corrupt safetensors", out=out)


def test_unsupported_adapter_type(tiny_spm, tmp_path):
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    cfg_path = tmp_path / "ckpts" / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["peft_type"] = "IA3"
    cfg_path.write_text(json.dumps(cfg))
    out = tmp_path / "merged"
    expect_error(merge(tiny_spm[0], tmp_path / "ckpts", out, check=False), "unsupported adapter type", "IA3",
                 out=out)


def test_non_finite_merge_names_the_tensor(tiny_spm, tmp_path):
    from safetensors.torch import save_file
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    st = tmp_path / "ckpts" / "a" / "adapter_model.safetensors"
    tensors = load_file(st)
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_B" in k)
    tensors[key][0, 0] = float("inf")
    save_file(tensors, st)
    out = tmp_path / "merged"
    expect_error(merge(tiny_spm[0], tmp_path / "ckpts", out, check=False), "model.layers.1.self_attn.v_proj.weight",
                 "non-finite", out=out)


def test_not_enough_disk_space(tiny_spm, tmp_path):
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    out = tmp_path / "merged"
    proc = merge(tiny_spm[0], tmp_path / "ckpts", out, check=False, env={"LORA_SHIP_FAKE_FREE_BYTES": "1000"})
    expect_error(proc, "not enough disk space", out=out)


def test_failed_merge_keeps_previous_output(tiny_spm, tmp_path):
    make_adapter(tiny_spm[1], tmp_path / "ckpts" / "a")
    out = tmp_path / "merged"
    merge(tiny_spm[0], tmp_path / "ckpts", out)
    before = (out / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "ckpts" / "a")
    (tmp_path / "ckpts" / "a").mkdir()
    proc = merge(tiny_spm[0], tmp_path / "ckpts", out, check=False)
    assert proc.returncode != 0
    assert (out / "model.safetensors").read_bytes() == before


def test_missing_base_model_path(tmp_path):
    proc = run_script("prepare_base.py", "--base-model", str(tmp_path / "no-such-model"), "--out", tmp_path / "o",
                      check=False)
    expect_error(proc, "BASE_MODEL path", "does not exist")


# ---- checked before any long step (check_inputs.py, `make check`) ----

def check(base, ckpts, *extra, base_model=None, quant="q8_0"):
    return run_script("check_inputs.py", "--quant", quant, "--base-model", base_model or base, "--base", base,
                      "--checkpoints-dir", ckpts, *extra, check=False)


def test_check_passes_a_fitting_adapter_and_refuses_what_the_merge_would(tiny_spm, tmp_path):
    base_dir, base_model, _ = tiny_spm
    make_adapter(base_model, tmp_path / "ckpts" / "a")
    ok = check(base_dir, tmp_path / "ckpts")
    assert ok.returncode == 0 and "inputs ok: QUANT=q8_0" in ok.stdout and "fits" in ok.stdout, ok.stderr
    expect_error(check(base_dir, tmp_path / "ckpts", quant="q9_9"), "unknown QUANT=q9_9")
    expect_error(check(base_dir, tmp_path / "ckpts", base_model=str(tmp_path / "nope")), "BASE_MODEL path")
    expect_error(check(base_dir, tmp_path / "ckpts", "--checkpoint", "missing"), "CHECKPOINT=missing")
    other, _ = make_tiny_llama(tmp_path / "other", "spm", hidden=32)
    make_adapter(other, tmp_path / "wrong" / "a")
    expect_error(check(base_dir, tmp_path / "wrong"), "does not fit base")
    cfg_path = tmp_path / "ckpts" / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "bias": "all"}))
    expect_error(check(base_dir, tmp_path / "ckpts"), "trains biases")


def test_check_names_the_demo_adapter_when_none_is_given(tiny_spm, tmp_path):
    """No checkpoint of the user's: the fallback (make's shipped demo adapter) is checked and named as such."""
    base_dir, base_model, _ = tiny_spm
    make_adapter(base_model, tmp_path / "demo")
    (tmp_path / "ckpts").mkdir()
    proc = check(base_dir, tmp_path / "ckpts", "--fallback", tmp_path / "demo")
    assert proc.returncode == 0 and "the shipped demo adapter" in proc.stdout, proc.stderr
    make_adapter(base_model, tmp_path / "ckpts" / "mine")
    proc = check(base_dir, tmp_path / "ckpts", "--fallback", tmp_path / "demo")
    assert proc.returncode == 0 and "mine, fits" in proc.stdout and "shipped" not in proc.stdout, proc.stderr


@pytest.mark.parametrize("where", ["checkpoint", "base"])
def test_broken_tokenizer_model_is_one_line_naming_the_file(tiny_spm, tmp_path, where):
    """A tokenizer.model that is no SentencePiece model: the check and the merge each stop with one line."""
    base_dir, base_model, tok = tiny_spm
    if where == "base":
        shutil.copytree(base_dir, tmp_path / "base")
        base_dir = tmp_path / "base"
        (base_dir / "tokenizer.model").write_bytes(b"this is not a sentencepiece model")
    make_adapter(base_model, tmp_path / "ckpts" / "a")
    if where == "checkpoint":
        tok.save_pretrained(tmp_path / "ckpts" / "a")
        (tmp_path / "ckpts" / "a" / "tokenizer.model").write_bytes(b"\x0a\x05junk")
    bad = (tmp_path / "ckpts" / "a" if where == "checkpoint" else base_dir) / "tokenizer.model"
    expect_error(check(base_dir, tmp_path / "ckpts"), str(bad), "not a valid SentencePiece model")
    out = tmp_path / "merged"
    expect_error(merge(base_dir, tmp_path / "ckpts", out, check=False), str(bad), "not a valid SentencePiece", out=out)


def test_adapter_recorded_for_another_base_warns(tiny_spm, tmp_path):
    """Shapes that fit but a recorded base of another name: merged, with one warning line; the same name in
    another spelling (a hub id against its download folder) is no warning."""
    base_dir, base_model, _ = tiny_spm
    make_adapter(base_model, tmp_path / "ckpts" / "a")
    cfg_path = tmp_path / "ckpts" / "a" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}))
    proc = merge(base_dir, tmp_path / "ckpts", tmp_path / "merged")
    assert "warning: the adapter was trained on mistralai/Mistral-7B-v0.1" in proc.stderr
    assert "warning" in check(base_dir, tmp_path / "ckpts").stderr
    same = tmp_path / "mistralai--Mistral-7B-v0.1"
    shutil.copytree(base_dir, same)
    assert "warning" not in merge(same, tmp_path / "ckpts", tmp_path / "merged2").stderr
    cfg_path.write_text(json.dumps({**cfg, "base_model_name_or_path": "unsloth/mistral-7b-v0.1-bnb-4bit"}))
    assert "warning" not in check(same, tmp_path / "ckpts").stderr  # Unsloth's 4-bit upload of the same model


def test_hub_download_takes_bin_weights_only_where_there_are_no_safetensors():
    from prepare_base import hub_patterns
    both = ["config.json", "model-00001-of-00002.safetensors", "pytorch_model-00001-of-00002.bin"]
    assert "*.safetensors" in hub_patterns(both) and "pytorch_model*.bin" not in hub_patterns(both)
    older = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "tokenizer.model"]
    assert "pytorch_model*.bin" in hub_patterns(older) and "*.safetensors" not in hub_patterns(older)
