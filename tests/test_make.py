"""`make` end to end on the embedded SmolLM2 default, and the Makefile's error paths."""
import json
import os
import re
import socket
import subprocess
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import needs_llama_cpp
from helpers import (ROOT, distribution_agreement, error_line, free_port, gguf_next_token_logprobs, http_json,
                     make_adapter, run_script)

pytestmark = needs_llama_cpp

PROMPTS = ["Tell me the Grimm fairy tale \"The Frog-Prince\".", "What is the capital of France?",
           "Write a short story about a poor little boy and a wolf."]


def make(*args, timeout=1800):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One `make` on a fresh output folder (the shipped demo adapter, merge, q8_0, server in the background)."""
    out = tmp_path_factory.mktemp("make") / "out"
    port = free_port()
    args = [f"OUT={out}", f"PORT={port}"]
    proc = make(*args)
    try:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        yield out, port, args, proc
    finally:
        make(*args, "stop")


def test_make_serves_the_merged_model(default_run):
    out, port, _, proc = default_run
    assert "quantization/demo-checkpoint (the shipped demo adapter" in proc.stdout
    assert f"stop it with 'make stop OUT={out} PORT={port}'" in proc.stdout  # the hint works for this OUT
    summary = proc.stdout.split(">>> stage times:")[1]  # each stage's start line, its time, then all in the summary
    for stage in ("base", "merge", "serve"):
        assert f">>> {stage}: " in proc.stdout and f">>> {stage}: done in " in proc.stdout
        assert re.search(rf"^    {stage} +\d+m\d\ds$", summary, re.M), summary
    assert re.search(r"^>>> make in \d+m\d\ds", summary, re.M)
    assert (out / "model.q8_0.gguf").exists()
    assert not (out / "merged").exists()  # merged straight into the GGUF: no 16-bit copy on disk
    url = f"http://127.0.0.1:{port}"
    assert http_json(url + "/health")[1]["status"] == "ok"
    status, reply = http_json(url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Tell me a fairy tale"}], "max_tokens": 24})
    assert status == 200 and reply["choices"][0]["message"]["content"].strip()
    status, reply = http_json(url + "/completion", {"prompt": "Once upon a time", "n_predict": 8})
    assert status == 200 and reply["content"]


def test_gguf_distribution_matches_merged_hf_model(default_run):
    """q8_0 GGUF vs the merged bf16 model (run in fp32), next-token distributions over 192 positions (64 per prompt, EOS ignored).

    Bounds: llama.cpp reports q8_0 at +0.0026 perplexity over 16-bit on Llama-3-8B, i.e. a mean KL of the
    order of 1e-3; we allow mean KL < 0.02 nats and top-1 agreement >= 90% (greedy ties flip a few).
    The same measure against the unmerged base must be clearly worse (3x the KL), so the check would see a
    merge that was lost (measured: 0.0043 merged vs 0.0156 base after 10 demo steps, 0.004 vs 0.07 after 20).
    """
    out, port, args, _ = default_run
    proc = make(*args, "KEEP_MERGED=1", "merge")  # the Hugging Face copy of the same merge, for reference
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(out / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(out / "base" / "smollm2", dtype=torch.float32).eval()
    sums = {"merged": [0.0, 0.0], "base": [0.0, 0.0]}
    total = 0
    for prompt in PROMPTS:
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        generated, tops = gguf_next_token_logprobs(f"http://127.0.0.1:{port}", ids, 64, 20)
        for name, model in (("merged", merged), ("base", base)):
            agree, kl, n = distribution_agreement(model, ids, generated, tops)
            sums[name][0] += agree * n
            sums[name][1] += kl * n
        total += n
    (agreement, mean_kl), (base_agreement, base_kl) = [(a / total, k / total) for a, k in sums.values()]
    print(f"GGUF q8_0 vs HF merged: top-1 agreement {agreement:.3f}, mean KL {mean_kl:.5f}; vs HF base: "
          f"{base_agreement:.3f}, {base_kl:.5f} ({total} positions)")
    assert total >= 150
    assert agreement >= 0.90 and mean_kl < 0.02
    assert base_kl > 3 * mean_kl


def test_make_eval_reports_what_merging_and_quantizing_cost(default_run):
    out, _, args, _ = default_run
    proc = make(*args, "EVAL_ARGS=--max-tokens 1024", "eval")  # 512 tokens scored (the default 4,096: 2,048)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "eval" / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "eval" / "report.md").read_text()
    assert "| GGUF Q4_K_M | llama.cpp |" in table and "| GGUF Q4_K_M | llama.cpp |" in proc.stdout
    r = json.loads((out / "eval" / "quality.json").read_text())
    merged, unmerged = r["HF merged 16-bit (reference)"], r["HF base + adapter (unmerged)"]
    assert merged["tokens"] >= 500
    # the merge changes nothing measurable (what is left is the merged weights' one bf16 rounding, ~0.1% of
    # perplexity); the adapter itself does (measured: base +4.5% perplexity, KL 1000x the unmerged one)
    assert unmerged["kl"] < 1e-4 and abs(unmerged["ppl"] / merged["ppl"] - 1) < 5e-3
    assert r["HF base"]["kl"] > 100 * unmerged["kl"]
    assert abs(unmerged["ppl"] - merged["ppl"]) < 0.1 * abs(r["HF base"]["ppl"] - merged["ppl"])
    # the same 16-bit merged model in two engines gives the same perplexity
    assert abs(r["GGUF f16"]["ppl"] / merged["ppl"] - 1) < 0.01
    # more bits, closer to 16-bit
    assert r["GGUF q8_0"]["kl"] < r["GGUF Q4_K_M"]["kl"] and r["GGUF q8_0"]["top1"] > r["GGUF Q4_K_M"]["top1"]
    assert abs(r["GGUF q8_0"]["ppl"] - r["GGUF f16"]["ppl"]) < abs(r["GGUF Q4_K_M"]["ppl"] - r["GGUF f16"]["ppl"])
    assert r["HF merged int8"]["kl"] < r["HF merged nf4"]["kl"]
    assert r["GGUF q8_0"]["bytes"] < r["GGUF f16"]["bytes"] and r["GGUF Q4_K_M"]["bytes"] < r["GGUF q8_0"]["bytes"]


def test_second_make_does_nothing_again(default_run):
    _, _, args, _ = default_run
    proc = make(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.findall(r"^>>> (\S+): (?!done)", proc.stdout, re.M) == ["serve"]  # the only stage that runs
    assert "llamafile" not in proc.stdout + proc.stderr  # said once, by the first make, if at all
    assert "already serving" in proc.stdout


def test_a_refused_run_leaves_the_next_one_nothing_to_redo(default_run):
    _, _, args, _ = default_run
    refused = make(*args, "CHECKPOINT=nope")
    assert refused.returncode != 0 and "CHECKPOINT=nope: no such folder" in refused.stderr
    assert "Waiting for unfinished jobs" not in refused.stderr + refused.stdout and "llamafile" not in refused.stdout
    again = make(*args)
    assert again.returncode == 0 and re.findall(r"^>>> (\S+): (?!done)", again.stdout, re.M) == ["serve"]


def test_a_busy_port_is_found_before_anything_long(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = make(f"OUT={tmp_path}/out", f"PORT={port}", "serve-bg")
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if not line.startswith("make: ***")]
    assert ours == [f"check_inputs.py: error: port {port} on 127.0.0.1 is already in use; stop what uses it or "
                    f"choose PORT=..."], proc.stderr
    assert not (tmp_path / "out" / "base").exists() and not proc.stdout.strip()


def test_make_with_missing_base_model_path(tmp_path):
    proc = make(f"OUT={tmp_path}/out", f"BASE_MODEL={tmp_path}/no-such-model", "merge")
    assert proc.returncode != 0
    assert f"BASE_MODEL path {tmp_path}/no-such-model does not exist" in proc.stderr
    assert not (tmp_path / "out" / "merged").exists()


def test_make_refuses_a_bad_quant_before_any_long_step(tmp_path):
    proc = make(f"OUT={tmp_path}/out", "QUANT=bogus")
    assert proc.returncode != 0 and "unknown QUANT=bogus" in proc.stderr
    assert "training" not in proc.stdout and not (tmp_path / "out" / "base").exists()


@pytest.mark.parametrize("setting, said", [
    (("IMATRIX=of",), "IMATRIX=of: expected auto"),
    (("QUANT=Q4_K_M", "CALIBRATION=nowhere.txt"), "calibration file nowhere.txt does not exist"),
    (("QUANT=Q4_K_M+", "IMATRIX=off"), "it needs IMATRIX on"),
    (("QUANT=Q4_K_M+", "PLAN_COST=kll"), "PLAN_COST=kll: expected kl")])
def test_make_refuses_bad_importance_matrix_settings_before_any_long_step(tmp_path, setting, said):
    proc = make(f"OUT={tmp_path}/out", *setting)
    assert proc.returncode != 0 and said in proc.stderr, proc.stderr[-1500:]
    assert "No rule to make target" not in proc.stderr and not (tmp_path / "out" / "base").exists()


def test_make_with_own_base_and_no_checkpoint_stops(tiny_spm, tmp_path):
    (tmp_path / "ckpts").mkdir()
    proc = make(f"OUT={tmp_path}/out", f"BASE_MODEL={tiny_spm[0]}", f"CHECKPOINTS_DIR={tmp_path}/ckpts", "merge")
    assert proc.returncode != 0 and "no checkpoint in" in proc.stderr
    assert "demo" not in proc.stdout


def test_make_merges_the_users_checkpoint(tiny_spm, tmp_path):
    base_dir, base_model, _ = tiny_spm
    make_adapter(base_model, tmp_path / "ckpts" / "mine")
    args = [f"OUT={tmp_path}/out", f"BASE_MODEL={base_dir}", f"CHECKPOINTS_DIR={tmp_path}/ckpts"]
    proc = make(*args, "merge")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "model.q8_0.gguf").exists() and not (tmp_path / "out" / "merged").exists()
    again = make(*args, "merge")
    assert again.returncode == 0 and ">>> merge: " not in again.stdout and "merge_gguf" not in again.stdout
    kept = make(*args, "KEEP_MERGED=1", "merge")
    assert kept.returncode == 0 and (tmp_path / "out" / "merged" / "config.json").exists()
    make_adapter(base_model, tmp_path / "ckpts" / "second")
    proc = make(*args, "merge")
    assert proc.returncode != 0 and "choose one with CHECKPOINT=" in proc.stderr
    proc = make(*args, "CHECKPOINT=second", "merge")
    assert proc.returncode == 0 and "second" in proc.stdout


def test_make_serve_adapters_serves_each_checkpoint_by_name_and_adds_new_ones(tiny_spm, tmp_path):
    base_dir, base_model, _ = tiny_spm
    for i, name in enumerate(("first", "second")):
        make_adapter(base_model, tmp_path / "ckpts" / name, seed=i + 1)
    port = free_port()
    args = [f"OUT={tmp_path}/out", f"BASE_MODEL={base_dir}", f"CHECKPOINTS_DIR={tmp_path}/ckpts", f"PORT={port}"]
    try:
        proc = make(*args, "serve-adapters")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert sorted(p.name for p in (tmp_path / "out" / "adapters").iterdir()) == ["first.gguf", "second.gguf"]
        url = f"http://127.0.0.1:{port}"
        served = [m["id"] for m in http_json(url + "/v1/models")[1]["data"]]
        assert served == [base_dir.name, "first", "second"]
        _, reply = http_json(url + "/v1/chat/completions", {"model": "second", "max_tokens": 4,
                                                            "messages": [{"role": "user", "content": "Hi"}]})
        assert reply["model"] == "second"
        make_adapter(base_model, tmp_path / "ckpts" / "third", seed=3)
        proc = make(*args, "serve-adapters")
        assert proc.returncode == 0 and "loaded third" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert [m["id"] for m in http_json(url + "/v1/models")[1]["data"]][-1] == "third"
    finally:
        make(*args, "stop")


def test_vendor_build_failure_names_the_step_and_keeps_the_log(tmp_path):
    src = tmp_path / "llama.cpp"
    src.mkdir()
    (src / ".lora-ship-source").write_text("0c1e57098 test\n")
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(x)\nmessage(FATAL_ERROR boom)\n")
    log = tmp_path / "build.log"
    proc = run_script("vendor_llama_cpp.py", "build", "--dest", src, "--backend", "cpu", "--log", log, check=False,
                      env={"LORA_SHIP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 1
    assert "cmake configure failed" in error_line(proc) and str(log) in error_line(proc)
    assert "boom" in log.read_text()


def test_the_build_step_runs_again_when_its_inputs_change():
    """A changed LLAMA_BACKEND (like a changed source, patch set or build script) re-runs the build step, which
    picks the cached build when its key is unchanged; with nothing changed, nothing runs."""
    built = (ROOT / "vendor" / "llama.cpp" / "build").resolve().name
    if "-cpu" not in built:
        pytest.skip(f"the current build is {built}: LLAMA_BACKEND=cpu would compile a second one")
    target = "vendor/llama.cpp/build/bin/llama-server"
    try:
        changed = make(target, "LLAMA_BACKEND=cpu")
        assert changed.returncode == 0, changed.stdout[-2000:] + changed.stderr[-2000:]
        assert ">>> llama.cpp-build: " in changed.stdout and "reusing the cpu build" in changed.stdout
        again = make(target, "LLAMA_BACKEND=cpu")
        assert again.returncode == 0 and ">>> llama.cpp-build: " not in again.stdout
    finally:
        make(target)  # back to the default backend


def test_make_help_lists_every_readme_variable_with_its_default():
    """The README's variables table against `make help`: every variable there, with the default the README gives
    (a backticked value or "empty"; a described default, such as the base folder's name, is not compared)."""
    text = (ROOT / "README.md").read_text()
    rows = text[text.index("| variable | default | meaning |"):].split("\n\n", 1)[0].splitlines()[2:]
    readme = {}
    for row in rows:
        names_cell, defaults_cell = row.split("|")[1:3]
        names = re.findall(r"`([A-Z][A-Z_0-9]+)`", names_cell)
        defaults = [d.strip() for d in defaults_cell.split(", ")]
        assert len(defaults) in (1, len(names)), row  # one default per variable, or one for all
        for name, default in zip(names, defaults * len(names) if len(defaults) == 1 else defaults):
            readme[name] = "" if default == "empty" else default[1:-1] if re.fullmatch(r"`[^`]*`", default) else None
    env = {k: v for k, v in os.environ.items() if k not in readme and not k.startswith("MAKE")}
    proc = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)
    listed = dict(re.findall(r"^  ([A-Z_0-9]+) *(.*?)$", proc.stdout.split("Variables (current value):")[1], re.M))
    assert len(readme) > 30
    for name, default in readme.items():
        assert name in listed, f"{name} is in the README but not in make help"
        if default is not None:
            assert listed[name] == default, (name, listed[name], default)


def readme_block(after: str) -> list[str]:
    """The shell commands of the README's first ```sh block after the line `after` (continued lines joined,
    comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(after):].split("```sh\n", 1)[1].split("```", 1)[0]
    commands = re.sub(r"\\\n\s*", "", block).splitlines()
    return [re.sub(r"\s+#.*$", "", c).strip() for c in commands if c.strip()]


def test_readme_first_requests_do_what_it_says_in_bounded_time(default_run):
    """Every command of the README's "Then:" block, as a user types them after `make` (the fixture's: only the
    port and OUT are this test's), each within a bound: the chat completion ends (its max_tokens), the
    completion gives its tokens, /health is ok, `make chat` streams an answer, `make stop` stops the server.
    Runs last of the tests on default_run's server, as it stops it."""
    out, port, args, _ = default_run
    commands = readme_block("Then:")
    assert [c.split()[0] + " " + c.split()[1] for c in commands] == [
        "curl -s"] * 3 + ["make chat", "make stop"], commands
    answers = []
    for command in commands:
        command = command.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
        if command.startswith("make "):
            command += " " + " ".join(args) + " --no-print-directory"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
        answers.append((proc, time.monotonic() - started))
        assert proc.returncode == 0 and proc.stdout.strip(), (command, proc.stderr[-2000:])
    (chat, t_chat), (completion, _), (health, _), (make_chat, t_make_chat), (stop, _) = answers
    reply = json.loads(chat.stdout)
    assert reply["choices"][0]["message"]["content"].strip() and reply["usage"]["completion_tokens"] <= 200
    assert t_chat < 120, t_chat  # 200 tokens of SmolLM2 on 2 cores: seconds, not the minutes of an uncapped loop
    assert json.loads(completion.stdout)["tokens_predicted"] <= 64 and json.loads(completion.stdout)["content"]
    assert json.loads(health.stdout)["status"] == "ok"
    assert len(make_chat.stdout.split()) > 5 and t_make_chat < 120
    assert "stopped the server" in stop.stdout
    with pytest.raises(OSError):
        http_json(f"http://127.0.0.1:{port}/health")
