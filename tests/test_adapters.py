"""Many fine-tunes, one base: adapters exported for llama.cpp (export_adapters.py) and served unmerged, each chosen
per request by name (serve.py --adapters, patches/llama.cpp/0009), requests for different adapters decoded in
the same batches (0011), against the merged GGUF of the same adapter."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import needs_llama_cpp, needs_llama_source
from helpers import (LLAMA_SERVER, ROOT, error_line, free_port, http_json, make_adapter,
                     make_tiny_llama, read_gguf, run_script, running_server, server_log, shared_folder)

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = list(range(200, 232))  # token ids: the same prompt for every server


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The folder of a tiny Llama with the real Llama 2 tokenizer and room for long requests."""
    def build(folder):
        model, _ = make_tiny_llama(folder, "spm", seed=3)
        model.config.max_position_embeddings = 32768  # room for a request that is still generating a while later
        model.save_pretrained(folder, safe_serialization=True)
    return shared_folder(tmp_path_factory, "adapters-base", build)


@pytest.fixture(scope="module")
def base_gguf(base, tmp_path_factory):
    """type -> the base as a GGUF: f16 as served, f32 where a test compares tokens (its rounding is far below the
    tiny model's near-ties)."""
    def build(out):
        for outtype in ("f16", "f32"):
            run_script("convert_gguf.py", "--model", base, "--quant", outtype, "--out",
                       out / f"base.{outtype}.gguf", "--log", out / "c.log")
    out = shared_folder(tmp_path_factory, "adapters-base-gguf", build)
    return {t: out / f"base.{t}.gguf" for t in ("f16", "f32")}


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory):
    """Adapters made by PEFT on the tiny base: two that llama.cpp can apply unmerged (plain q/v; all-linear with
    rsLoRA and rank and alpha patterns, so the scale differs per module) and three it cannot."""
    def build(folder):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(base)
        make_adapter(model, folder / "alpha", seed=1)
        make_adapter(model, folder / "beta", seed=2, r=8, lora_alpha=16, use_rslora=True, target_modules=ALL_LINEAR,
                     rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 3})
        make_adapter(model, folder / "dora", seed=3, use_dora=True)
        make_adapter(model, folder / "head", seed=4, modules_to_save=["lm_head"])
        make_adapter(model, folder / "embedding", seed=5, target_modules=["embed_tokens", "q_proj"])
    return shared_folder(tmp_path_factory, "adapters-checkpoints", build)


@pytest.fixture(scope="module")
def exported(base, checkpoints, tmp_path_factory):
    """(type -> folder of the exported adapters, what the f16 export wrote to stderr)."""
    def build(out):
        for t in ("f16", "f32"):
            proc = run_script("export_adapters.py", "--base", base, "--checkpoints-dir", checkpoints, "--out-dir",
                              out / t, "--outtype", t, "--log", out / "convert.log")
            (out / f"{t}.stderr").write_text(proc.stderr)
    out = shared_folder(tmp_path_factory, "adapters-exported", build)
    return {t: out / t for t in ("f16", "f32")}, (out / "f16.stderr").read_text()


@needs_llama_source
def test_export_writes_what_llama_cpp_can_apply_and_names_the_rest(exported):
    folders, stderr = exported
    out = folders["f16"]
    assert sorted(p.name for p in out.iterdir()) == ["alpha.gguf", "beta.gguf"]
    reasons = {line.split(":")[0]: line for line in stderr.splitlines() if ": skipped: " in line}
    assert sorted(reasons) == ["dora", "embedding", "head"], stderr
    assert "DoRA" in reasons["dora"] and "modules_to_save" in reasons["head"] and "embedding" in reasons["embedding"]
    assert all("make CHECKPOINT=" in line for line in reasons.values())

    metadata, tensors = read_gguf(out / "beta.gguf")
    assert metadata["general.type"] == "adapter"
    assert metadata["adapter.lora.alpha"] == 0.0  # the scale is in B
    names = set(tensors)
    assert len(names) == 2 * 7 * 2  # A and B of 7 modules in each of 2 layers
    assert {"blk.0.attn_q.weight.lora_a", "blk.1.ffn_down.weight.lora_b"} <= names


@needs_llama_source
def test_export_again_keeps_fresh_files_and_drops_those_of_removed_checkpoints(base, checkpoints, tmp_path):
    ckpts = tmp_path / "ckpts"
    for name in ("alpha", "beta"):
        shutil.copytree(checkpoints / name, ckpts / name)
    out = tmp_path / "adapters"
    args = ("--base", base, "--checkpoints-dir", ckpts, "--out-dir", out, "--log", tmp_path / "convert.log")
    run_script("export_adapters.py", *args)
    first = (out / "alpha.gguf").stat().st_mtime_ns
    shutil.rmtree(ckpts / "beta")
    proc = run_script("export_adapters.py", *args)
    assert "alpha: up to date" in proc.stdout and (out / "alpha.gguf").stat().st_mtime_ns == first
    assert not (out / "beta.gguf").exists() and "beta: its checkpoint is gone" in proc.stdout


@needs_llama_source
def test_export_takes_a_trainer_folders_latest_checkpoint(base, checkpoints, tmp_path):
    ckpts = tmp_path / "ckpts"
    shutil.copytree(checkpoints / "alpha", ckpts / "run" / "checkpoint-5")
    shutil.copytree(checkpoints / "beta", ckpts / "run" / "checkpoint-10")
    proc = run_script("export_adapters.py", "--base", base, "--checkpoints-dir", ckpts, "--out-dir",
                      tmp_path / "adapters", "--log", tmp_path / "convert.log")
    assert "using the latest, checkpoint-10" in proc.stderr
    assert "run: 14 LoRA modules" in proc.stdout  # beta's 7 modules in 2 layers, not alpha's 4
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["run.gguf"]


@needs_llama_source
def test_export_of_nothing_servable_is_one_error(base, checkpoints, tmp_path):
    ckpts = tmp_path / "ckpts"
    shutil.copytree(checkpoints / "dora", ckpts / "dora")
    proc = run_script("export_adapters.py", "--base", base, "--checkpoints-dir", ckpts, "--out-dir",
                      tmp_path / "adapters", check=False)
    assert proc.returncode == 1
    assert error_line(proc) == ("export_adapters.py: error: none of the 1 checkpoint(s) can be served unmerged "
                                "(reasons above)")
    assert not list((tmp_path / "adapters").glob("*"))


def complete(url: str, model: str, n: int = 24, **extra) -> dict:
    _, out = http_json(url + "/completion", {"model": model, "prompt": PROMPT, "n_predict": n, "temperature": 0,
                                             "cache_prompt": False, "ignore_eos": True, **extra})
    return out


def greedy(url: str, model: str, n: int = 24) -> list[dict]:
    """The greedy continuation of PROMPT, each step with its two most likely tokens."""
    return complete(url, model, n, n_probs=2)["completion_probabilities"]


def assert_same_greedy(got: list[dict], want: list[dict], what: str, tol: float = 1e-3) -> None:
    """Two greedy continuations are the same model's: the same tokens at log-probabilities within tol, up to the
    end or up to a near-tie (top two within tol in `want`), after which the paths may part legitimately (a random
    tiny model has many; another adapter, or none, moves a log-probability by far more)."""
    for i, (g, w) in enumerate(zip(got, want)):
        top = w["top_logprobs"]
        if g["id"] != w["id"]:
            assert top[0]["logprob"] - top[1]["logprob"] < tol, f"{what}: token {i} differs with no near-tie"
            return
        assert abs(g["logprob"] - w["logprob"]) < tol, f"{what}: token {i}: {g['logprob']} vs {w['logprob']}"
    assert len(got) == len(want)


@pytest.fixture(scope="module")
def merged(base, checkpoints, tmp_path_factory):
    """(name, type) -> the GGUF of the base merged with that adapter (merge_gguf.py, the default merge)."""
    def build(tmp):
        for name, outtype in KINDS:
            run_script("merge_gguf.py", "--base", base, "--checkpoints-dir", checkpoints, "--checkpoint", name,
                       "--quant", outtype, "--out", tmp / f"{name}.{outtype}.gguf", "--log", tmp / "convert.log")
    KINDS = [(name, outtype) for name in ("alpha", "beta") for outtype in ("f16", "f32")]
    tmp = shared_folder(tmp_path_factory, "adapters-merged", build)
    return {(name, outtype): tmp / f"{name}.{outtype}.gguf" for name, outtype in KINDS}


@needs_llama_cpp
def test_each_adapter_served_by_name_as_its_merged_model(base_gguf, exported, merged, tmp_path):
    adapters = exported[0]["f32"]
    with running_server(base_gguf["f32"], tmp_path, extra=("--adapters", adapters, "--alias", "tiny")) as url:
        _, models = http_json(url + "/v1/models")
        assert [m["id"] for m in models["data"]] == ["tiny", "alpha", "beta"]
        served = {name: greedy(url, name) for name in ("tiny", "alpha", "beta")}
        _, chat = http_json(url + "/v1/chat/completions", {"model": "beta", "max_tokens": 4,
                                                           "messages": [{"role": "user", "content": "Hello"}]})
        assert chat["model"] == "beta"
        with pytest.raises(urllib.error.HTTPError) as e:
            http_json(url + "/v1/chat/completions", {"model": "gamma", "messages": [{"role": "user", "content": "Hi"}]})
        assert e.value.code == 404
        assert json.loads(e.value.read())["error"]["message"] == \
            "model 'gamma' not found; this server has: tiny, alpha, beta"
    with running_server(base_gguf["f32"], tmp_path) as url:
        assert_same_greedy(served["tiny"], greedy(url, "anything"), "base")
    for name in ("alpha", "beta"):
        with running_server(merged[name, "f32"], tmp_path) as url:
            assert_same_greedy(served[name], greedy(url, "anything"), name)
    firsts = {name: [s["id"] for s in steps[:4]] for name, steps in served.items()}
    assert len({tuple(t) for t in firsts.values()}) == 3, firsts  # each adapter changes the answer at once


def kl_to_merged(base: Path, adapter: Path, merged_gguf: Path, tmp: Path) -> dict:
    """llama-perplexity's KL divergence of base + adapter (unmerged) from the merged GGUF, over 4 x 64 positions."""
    from eval_quality import parse_perplexity

    text = tmp / "text.txt"
    text.write_text((ROOT / "docs" / "guide.md").read_text()[:40000])
    tool = LLAMA_SERVER.parent / "llama-perplexity"
    common = ["-f", text, "-c", "128", "--chunks", "4", "-t", "2"]
    kld = tmp / "merged.kld"
    run = lambda *a: subprocess.run(list(map(str, [tool, *a, *common])), capture_output=True, text=True, check=True)  # noqa: E731
    run("-m", merged_gguf, "--kl-divergence-base", kld)
    out = run("-m", base, "--lora", adapter, "--kl-divergence-base", kld, "--kl-divergence", "-lv", "4")  # info lines
    text = out.stdout + out.stderr
    groups = re.search(r"(\d+) LoRA groups", text)  # patch 0013: weights sharing an input
    return {**parse_perplexity(text), "lora_groups": int(groups[1]) if groups else 0}


@needs_llama_cpp
@pytest.mark.parametrize("name", ["alpha", "beta"])
def test_unmerged_adapter_distributions_equal_the_merged_gguf(base_gguf, exported, merged, name, tmp_path):
    """f16 base + f16 adapter against the merged f16 GGUF: full next-token distributions over 256 positions.
    alpha's q and v read one input and have one rank: applied as one group a layer (patch 0013)."""
    result = kl_to_merged(base_gguf["f16"], exported[0]["f16"] / f"{name}.gguf", merged[name, "f16"], tmp_path)
    assert result["kl"] <= 1e-4 and result["top1"] >= 0.98, result
    if name == "alpha":
        assert result["lora_groups"] == 2, result  # the tiny base's two layers


@needs_llama_cpp
def test_two_adapters_at_once_each_get_their_own_tokens(base_gguf, exported, tmp_path):
    """Requests for alpha (r=4, q/v), beta (all-linear, mixed ranks) and the base at once share batches, each
    token with its own adapter (0011's stacked adapters and per-token masks): each gets its tokens alone."""
    adapters = exported[0]["f32"]
    with running_server(base_gguf["f32"], tmp_path, extra=("--adapters", adapters, "--alias", "tiny")) as url:
        assert "adapters per sequence in shared batches: on" in server_log(tmp_path, url)
        alone = {name: greedy(url, name, 48) for name in ("tiny", "alpha", "beta")}
        got, errors = {}, []

        def ask(i: int, name: str) -> None:
            try:
                got[i] = (name, greedy(url, name, 48))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        threads = [threading.Thread(target=ask, args=(i, name)) for i, name in enumerate(["alpha", "beta", "tiny"] * 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and len(got) == 9
        for name, steps in got.values():
            assert_same_greedy(steps, alone[name], name)


@needs_llama_cpp
def test_adapter_added_while_serving_goes_online_without_waiting_for_requests_in_flight(
        base, base_gguf, checkpoints, tmp_path):
    """beta is exported and loaded while alpha streams; alpha keeps streaming through it, without an error, and
    beta answers before alpha is done. alpha asks for more tokens than the whole test needs (at the ~600 tokens/s
    of an idle 2-core box: about a minute) and is cut off by the client once beta has answered."""
    ckpts, adapters = tmp_path / "ckpts", tmp_path / "adapters"
    shutil.copytree(checkpoints / "alpha", ckpts / "alpha")
    export = ("--base", base, "--checkpoints-dir", ckpts, "--out-dir", adapters, "--log", tmp_path / "c.log")
    run_script("export_adapters.py", *export)
    port = free_port()
    serve = ("--adapters", adapters, "--alias", "tiny", "--ctx-size", "32768", "--parallel", "4")
    with running_server(base_gguf["f16"], tmp_path, port=port, extra=serve) as url:
        req = urllib.request.Request(url + "/completion", json.dumps({
            "model": "alpha", "prompt": PROMPT, "n_predict": 32000, "ignore_eos": True, "stream": True}).encode(),
            headers={"Content-Type": "application/json"})
        chunks, started, beta_done = [], threading.Event(), []

        def read_stream() -> None:  # alpha: every chunk with the time it came, until 16 came after beta's answer
            with urllib.request.urlopen(req, timeout=600) as stream:
                for line in stream:
                    if line.startswith(b"data: {"):
                        chunks.append((time.monotonic(), json.loads(line[6:])))
                        started.set()
                        if beta_done and sum(t > beta_done[0] for t, _ in chunks[-16:]) == 16:
                            break  # closing the stream cancels alpha

        reader = threading.Thread(target=read_stream)
        reader.start()
        assert started.wait(60)
        shutil.copytree(checkpoints / "beta", ckpts / "beta")
        run_script("export_adapters.py", *export)
        proc = run_script("serve.py", "start", "--background", "--model", base_gguf["f16"], "--port", port,
                          "--pid-file", tmp_path / f"server-{port}.pid", "--engine", "llama-server", "--llama-server",
                          LLAMA_SERVER, *serve)
        assert "loaded beta" in proc.stdout
        _, models = http_json(url + "/v1/models")
        assert [m["id"] for m in models["data"]] == ["tiny", "alpha", "beta"]
        assert len(greedy(url, "beta")) == 24
        beta_done.append(time.monotonic())
        reader.join()
    assert not any("error" in c or c.get("stop") for _, c in chunks)  # alpha was neither failed nor ended
    assert sum(t > beta_done[0] for t, _ in chunks) == 16  # and still streaming after beta's answer


@needs_llama_source
def test_export_advice_follows_why_an_adapter_was_skipped(base, checkpoints, tmp_path):
    """An adapter of another base: skipped with no advice to merge it on this one (which would be refused), but
    with the base it records; one that fits while recording another base: exported, with make check's warning."""
    import shutil
    from transformers import AutoModelForCausalLM
    folder = tmp_path / "ckpts"
    shutil.copytree(checkpoints / "alpha", folder / "renamed")
    cfg = json.loads((folder / "renamed" / "adapter_config.json").read_text())
    (folder / "renamed" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/x-7b"}))
    small, _ = make_tiny_llama(tmp_path / "small-base", "spm", hidden=32)
    make_adapter(small, folder / "small", seed=6)
    cfg = json.loads((folder / "small" / "adapter_config.json").read_text())
    (folder / "small" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/small"}))
    proc = run_script("export_adapters.py", "--base", base, "--checkpoints-dir", folder, "--out-dir", tmp_path / "out",
                      "--log", tmp_path / "convert.log")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["renamed.gguf"]
    lines = proc.stderr.splitlines()
    assert any(line.startswith("renamed: warning: the adapter was trained on org/x-7b") for line in lines), lines
    skipped = next(line for line in lines if line.startswith("small: skipped: "))
    assert skipped.endswith("; on the base it was trained on, merged: make CHECKPOINT=small BASE_MODEL=org/small")
    assert "serve it merged instead" not in skipped
