"""Serving: failures (a busy port, a server that cannot start, a public bind without a key), the defaults, and
the serving benchmark."""
import json
import re
import socket
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from lib.common import UserError
from helpers import LLAMA_SERVER, error_line, free_port, run_script

pytestmark = needs_llama_cpp


def start(*args, check=False):
    return run_script("serve.py", "start", "--background", "--engine", "llama-server", "--llama-server",
                      LLAMA_SERVER, *args, check=check)


def test_port_already_in_use(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start("--model", gguf, "--port", port, "--pid-file", tmp_path / "pid")
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in error_line(proc)
    assert not (tmp_path / "pid").exists()


def test_server_that_fails_to_come_up_shows_its_log(tmp_path):
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    log = tmp_path / "server.log"
    proc = start("--model", gguf, "--port", free_port(), "--pid-file", tmp_path / "pid", "--log", log)
    assert proc.returncode == 1
    assert "exited with code" in error_line(proc) and str(log) in error_line(proc)
    assert "last lines of the server log" in proc.stderr
    assert not (tmp_path / "pid").exists()


def test_public_bind_needs_an_api_key(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    proc = start("--model", gguf, "--host", "0.0.0.0", "--port", free_port(), "--api-key", "")
    assert proc.returncode == 1 and "without an API key" in error_line(proc)


def test_missing_model_file(tmp_path):
    proc = start("--model", tmp_path / "none.gguf", "--port", free_port())
    assert proc.returncode == 1 and "does not exist" in error_line(proc)


def test_stop_without_server_is_harmless(tmp_path):
    proc = run_script("serve.py", "stop", "--pid-file", tmp_path / "pid")
    assert "no server running" in proc.stdout


def gpu_defaults(monkeypatch, gpu: bool, engine: str = "llama-server", **overrides):
    """The server command serve.py builds, on a machine with or without a GPU (and a CUDA build)."""
    import argparse
    import serve
    monkeypatch.setattr(serve, "has_nvidia_gpu", lambda: gpu)
    monkeypatch.setattr(serve, "has_cuda_backend", lambda _: gpu)
    monkeypatch.setattr(serve, "cpu_slots", lambda _: (16, 4096))  # lib/slots.py: tested on its own below
    args = argparse.Namespace(model="m.gguf", host="127.0.0.1", port=8080, alias="lora-ship", gpu_layers="auto",
                              ctx_size="auto", parallel="auto", max_tokens=1024, backend_sampling="auto",
                              cache_ram="auto", api_key=None, extra_args="", adapters=None, keys_file=None,
                              admin_key_file=None, usage_log=None)
    vars(args).update(overrides)
    return serve.server_command(args, engine, LLAMA_SERVER)


def test_gpu_defaults_and_overrides(monkeypatch):
    gpu = gpu_defaults(monkeypatch, True)
    assert gpu[gpu.index("-ngl") + 1] == "999" and gpu[gpu.index("-np") + 1] == "32"
    # sampling stays on the CPU (on the patched server's threads) unless asked for: -bs measured slower
    assert "-bs" not in gpu and gpu[gpu.index("--cache-ram") + 1] == "0"
    assert "-bs" in gpu_defaults(monkeypatch, True, backend_sampling="on")
    assert "-c" not in gpu  # the engine fits the context to the GPU's free memory
    cpu = gpu_defaults(monkeypatch, False)
    assert cpu[cpu.index("-ngl") + 1] == "0"
    assert not {"-bs", "--cache-ram"} & set(cpu)  # the engine's own choices on a CPU
    assert cpu[cpu.index("-np") + 1] == "16" and cpu[cpu.index("-c") + 1] == str(16 * 4096)  # each slot 4,096
    assert cpu[cpu.index("-n") + 1] == "1024" and gpu[gpu.index("-n") + 1] == "1024"  # every request capped
    uncapped = gpu_defaults(monkeypatch, False, max_tokens=0, ctx_size="8192")
    assert uncapped[uncapped.index("-n") + 1] == "-1" and uncapped[uncapped.index("-c") + 1] == "8192"
    tuned = gpu_defaults(monkeypatch, True, parallel="8", backend_sampling="off", cache_ram="4096")
    assert tuned[tuned.index("-np") + 1] == "8" and "-bs" not in tuned
    assert tuned[tuned.index("--cache-ram") + 1] == "4096"
    llamafile = gpu_defaults(monkeypatch, True, engine="llamafile")  # an older engine: neither flag exists there
    assert not {"-bs", "--cache-ram"} & set(llamafile)
    with pytest.raises(UserError, match="llama-server flags"):
        gpu_defaults(monkeypatch, True, engine="llamafile", backend_sampling="on")
    with pytest.raises(UserError, match="--cache-ram takes MiB"):
        gpu_defaults(monkeypatch, True, cache_ram="lots")


def test_adapters_are_loaded_off_and_the_prompt_cache_is_off_with_them(monkeypatch, tmp_path):
    for name in ("b", "a"):
        (tmp_path / f"{name}.gguf").write_bytes(b"GGUF")
    cmd = gpu_defaults(monkeypatch, False, adapters=tmp_path)
    loras = [cmd[i + 1] for i, flag in enumerate(cmd) if flag == "--lora"]
    assert loras == [str(tmp_path / "a.gguf"), str(tmp_path / "b.gguf")]
    # each applies only to the requests that name it; a cached prompt does not say which adapter computed it
    assert "--lora-init-without-apply" in cmd and cmd[cmd.index("--cache-ram") + 1] == "0"
    with pytest.raises(UserError, match="--cache-ram cannot be used with --adapters"):
        gpu_defaults(monkeypatch, True, adapters=tmp_path, cache_ram="4096")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no adapter files"):
        gpu_defaults(monkeypatch, True, adapters=tmp_path / "empty")
    with pytest.raises(UserError, match="adapter folder .* does not exist"):
        gpu_defaults(monkeypatch, True, adapters=tmp_path / "missing")


def test_bench_serve_runs_the_engine_with_the_servers_batch_sizes():
    import argparse
    from bench import serve as bench_serve
    args = argparse.Namespace(prompt_tokens=16, max_tokens=8)
    server = ["llama-server", "-m", "m.gguf", "-ngl", "999", "-fa", "on", "-np", "32"]
    plain = bench_serve.engine_command(Path("bb"), "m.gguf", server, [1, 8], args)
    assert plain[plain.index("-ngl") + 1] == "999" and plain[plain.index("-fa") + 1] == "on"
    assert plain[plain.index("-npl") + 1] == "1,8" and plain[plain.index("-c") + 1] == str(8 * 24 + 256)
    assert not {"-b", "-ub"} & set(plain)  # the engine's own defaults, as the server's
    tuned = bench_serve.engine_command(Path("bb"), "m.gguf", server + ["--ubatch-size", "2048", "-b", "4096"],
                                       [1, 8], args)
    assert tuned[tuned.index("-ub") + 1] == "2048" and tuned[tuned.index("-b") + 1] == "4096"


def test_bench_serve_end_to_end(tiny_gguf, tmp_path):
    """make bench-serve's script on the tiny model: every counted request succeeds, the warm-up is not counted,
    the engine's numbers come from llama-batched-bench, and its own server is stopped afterwards."""
    port = free_port()
    proc = run_script("bench/serve.py", "--model", tiny_gguf, "--llama-bin", LLAMA_SERVER.parent, "--port", port,
                      "--clients", "1,3", "--requests", 2, "--prompt-tokens", 16, "--max-tokens", 8,
                      "--workdir", tmp_path, "--serve-args", f"--llama-server {LLAMA_SERVER} --extra-args '-ub 64'")
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["clients"], r["stream"], r["requests"], r["failed"]) for r in results["served"]] == [
        (1, False, 2, 0), (3, False, 6, 0), (1, True, 2, 0), (3, True, 6, 0)]
    assert all(r["aggregate"] > 0 for r in results["served"])
    assert all(r["ttft_p50"] > 0 for r in results["served"] if r["stream"])
    assert set(results["engine"]) == {"1", "3"} and all(e["end_to_end"] > 0 for e in results["engine"].values())
    assert "-ub" in results["server"]
    assert "| 3 | stream |" in proc.stdout
    # every prompt is exactly --prompt-tokens tokens, as the engine's are (the server logs each one it evaluates)
    evaluated = re.findall(r"prompt eval time = .*/\s*(\d+) tokens", (tmp_path / "server.log").read_text())
    # (the first: serve.py's one request through the chat template before it says the server is ready)
    assert len(evaluated) == 1 + 2 + 6 + 2 + 6 + 3 and set(evaluated[1:]) == {"16"}
    assert not (tmp_path / "server.pid").exists()
    with pytest.raises(ConnectionRefusedError):  # the benchmark's server is gone
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.llama_cpp_source
def test_slots_on_a_cpu_follow_the_cores_and_the_memory(tiny_gguf, tiny_spm):
    from helpers import read_gguf
    from lib.gguf_meta import kv_bytes_per_token, read_metadata
    from lib.slots import cpu_slots

    meta, full = read_metadata(tiny_gguf), read_gguf(tiny_gguf)[0]
    assert meta.keys() == full.keys()
    assert all(meta[k] == (len(v) if isinstance(v, list) else v) for k, v in full.items())  # arrays: their length
    cfg = tiny_spm[1].config
    per_token = kv_bytes_per_token(meta)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert per_token == cfg.num_hidden_layers * cfg.num_key_value_heads * 2 * head_dim * 2  # f16 K and V
    per_slot = min(cfg.max_position_embeddings, 4096)
    assert cpu_slots(tiny_gguf, cores=1, memory=1 << 40) == (16, per_slot)
    assert cpu_slots(tiny_gguf, cores=2, memory=1 << 40) == (32, per_slot)
    assert cpu_slots(tiny_gguf, cores=8, memory=1 << 40) == (32, per_slot)
    # a seventh of the memory for the KV cache: 8 slots fit where 16 would not, never fewer than 4
    assert cpu_slots(tiny_gguf, cores=2, memory=7 * 8 * per_slot * per_token) == (8, per_slot)
    assert cpu_slots(tiny_gguf, cores=2, memory=1) == (4, per_slot)


def byte_level_bpe_as_spm(tiny_bpe, folder: Path) -> Path:
    """The tiny Llama 3-tokenizer model with its tokenizer.json as Transformers' GGUF import writes it: byte-level
    BPE with byte_fallback on and a Sequence decoder, which llama.cpp's converter writes as an SPM vocabulary."""
    import shutil
    shutil.copytree(tiny_bpe[0], folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["model"]["byte_fallback"] = True
    tokenizer["decoder"] = {"type": "Sequence", "decoders": [tokenizer["decoder"]]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return folder


@pytest.mark.llama_cpp_source
def test_check_refuses_a_byte_level_bpe_the_converter_would_write_as_spm(tiny_bpe, tmp_path):
    from lib.merge import check_tokenizer
    check_tokenizer(tiny_bpe[0])  # the original: fine
    folder = byte_level_bpe_as_spm(tiny_bpe, tmp_path / "bad")
    with pytest.raises(UserError, match=r'tokenizer.json is a byte-level BPE .* set "byte_fallback": false'):
        check_tokenizer(folder)


@needs_llama_cpp
def test_a_server_that_cannot_answer_is_not_called_ready(tiny_bpe, tmp_path):
    """The converter writes the tokenizer above as an SPM vocabulary; llama-server loads it, reports healthy and
    fails every request. serve.py's one real request finds that: one line with the server's error, the log's
    last lines, exit 1, and the server stopped (the port is free again)."""
    folder = byte_level_bpe_as_spm(tiny_bpe, tmp_path / "bad")
    gguf = tmp_path / "bad.gguf"
    run_script("convert_gguf.py", "--model", folder, "--quant", "f16", "--out", gguf, "--log", tmp_path / "c.log")
    port = free_port()
    proc = run_script("serve.py", "start", "--background", "--model", gguf, "--port", port, "--engine",
                      "llama-server", "--llama-server", LLAMA_SERVER, "--pid-file", tmp_path / "pid",
                      "--log", tmp_path / "server.log", check=False)
    assert proc.returncode == 1
    assert re.match(r"serve.py: error: the server started but cannot answer: /(tokenize|v1/chat/completions): "
                    r"\d{3} ", error_line(proc)), proc.stderr
    assert "--- last lines of the server log ---" in proc.stderr
    assert not (tmp_path / "pid").exists()
    from lib.ports import port_in_use
    assert not port_in_use("127.0.0.1", port)  # nothing listens there any more


@needs_llama_cpp
def test_requests_are_capped_at_max_tokens_unless_they_ask(tiny_gguf, tmp_path):
    """--max-tokens (MAX_TOKENS) caps a request that sets no max_tokens / n_predict; one that does gets its own."""
    from helpers import http_json, running_server
    with running_server(tiny_gguf, tmp_path, extra=("--max-tokens", "12")) as url:
        _, out = http_json(url + "/completion", {"prompt": "1 2 3", "ignore_eos": True})
        assert out["tokens_predicted"] == 12 and out["stop_type"] == "limit"
        _, out = http_json(url + "/completion", {"prompt": "1 2 3", "ignore_eos": True, "n_predict": 20})
        assert out["tokens_predicted"] == 20
        _, out = http_json(url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                            "ignore_eos": True})
        assert out["usage"]["completion_tokens"] == 12 and out["choices"][0]["finish_reason"] == "length"
