"""Load and fault suite for the server (`make test-serve`): loopback only, bounded in requests and time.

Runs against LORA_SHIP_GGUF (make test-serve sets it to the pipeline's GGUF) or, in `make test`, a tiny
Llama converted here. Each fault is followed by a check that the server still answers a normal request.
"""
import http.client
import json
import math
import os
import threading
import time
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from helpers import LLAMA_SERVER, admin_headers, error_line, free_port, run_script, running_server, server_log

pytestmark = needs_llama_cpp
CTX = 1024  # per slot: small, so that an over-long prompt is cheap to send


@pytest.fixture(scope="module")
def gguf(tiny_gguf) -> Path:
    return Path(os.environ["LORA_SHIP_GGUF"]) if os.environ.get("LORA_SHIP_GGUF") else tiny_gguf


@pytest.fixture(scope="module")
def server_tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-faults")


@pytest.fixture(scope="module")
def server(gguf, server_tmp):
    with running_server(gguf, server_tmp, extra=("--parallel", "4", "--ctx-size", str(4 * CTX))) as url:
        yield url.removeprefix("http://")


def request(hostport: str, method: str, path: str, body: bytes | None = None,
            headers: dict | None = None, timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(hostport, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def completion(hostport: str, **fields) -> tuple[int, dict]:
    status, body = request(hostport, "POST", "/completion",
                           json.dumps({"prompt": "Once upon a time", "n_predict": 8, **fields}).encode())
    return status, json.loads(body)


def assert_still_serving(hostport: str) -> None:
    status, body = request(hostport, "GET", "/health")
    assert status == 200, body
    status, out = completion(hostport, ignore_eos=True)  # a random model may sample EOS early
    assert status == 200 and out["tokens_predicted"] == 8, out


def assert_clean_error(status: int, body: bytes) -> None:
    """An HTTP error with a JSON error message (not a dropped connection or a crash). llama-server answers a body
    it cannot parse with 500 and a parse-error message, so 500 counts as clean when it says why."""
    assert 400 <= status <= 500, (status, body[:300])
    assert json.loads(body)["error"]["message"]


def run_together(client, n: int, timeout: float) -> None:
    """client(0) .. client(n - 1), each on its own thread, started together; returns when all have ended."""
    threads = [threading.Thread(target=client, args=(c,)) for c in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)


def test_32_concurrent_clients_with_no_failure(server):
    failures, done = [], []

    def client(c: int) -> None:
        for k in range(3):
            try:
                status, out = completion(server, prompt=f"Tale {c}-{k}: once upon a time", n_predict=6,
                                             ignore_eos=True)
                if status != 200 or out.get("tokens_predicted") != 6:
                    failures.append((c, k, status))
                else:
                    done.append(1)
            except OSError as e:
                failures.append((c, k, repr(e)))

    run_together(client, 32, timeout=600)
    assert not failures and len(done) == 96
    assert_still_serving(server)


def test_an_idle_server_gives_each_request_the_lowest_free_slot(server):
    """patches/llama.cpp/0001: busy slots stay packed at the low end (stock llama-server rotates through the
    least recently used ones: 0, 1, 2, 3). Prompts share no prefix, so no slot is picked for a cached prompt."""
    slots = []
    for i in range(4):
        words = " ".join(f"{w}{i}" for w in "north wind rose over seven hills where a miller kept three grey "
                         "geese and a lame horse that would not pull".split())
        status, out = completion(server, prompt=f"{i} {words}", n_predict=2)
        assert status == 200, out
        slots.append(out["id_slot"])
    assert slots == [0, 0, 0, 0]


def test_malformed_json(server):
    assert_clean_error(*request(server, "POST", "/completion", b'{"prompt": "x", "n_predict": '))
    assert_clean_error(*request(server, "POST", "/v1/chat/completions", b"[not json"))
    assert_still_serving(server)


def test_unknown_fields_are_ignored(server):
    status, out = completion(server, no_such_field={"a": 1}, another=[1, 2])
    assert status == 200 and out["tokens_predicted"] == 8
    status, body = request(server, "POST", "/v1/chat/completions", json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "frobnicate": True}).encode())
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"


def test_wrong_content_type(server):
    body = json.dumps({"prompt": "Once upon a time", "n_predict": 4}).encode()
    status, out = request(server, "POST", "/completion", body, headers={"Content-Type": "text/plain"})
    assert status == 200 or 400 <= status < 500, status
    status, out = request(server, "POST", "/completion", b"prompt=hello", headers={
        "Content-Type": "application/x-www-form-urlencoded"})
    assert_clean_error(status, out)
    assert_still_serving(server)


def test_over_long_prompt_is_refused(server):
    status, body = request(server, "POST", "/completion",
                           json.dumps({"prompt": "once upon a time " * (2 * CTX), "n_predict": 4}).encode())
    assert_clean_error(status, body)
    assert_still_serving(server)


def test_huge_max_tokens_stops_at_the_context(server):
    """n_predict far beyond the context: the generation ends when the slot's context is full (a clean stop)."""
    status, out = completion(server, n_predict=10**9, ignore_eos=True)
    assert status == 200 and 0 < out["tokens_predicted"] <= CTX
    assert out["stop"] is True
    assert_still_serving(server)


def test_client_that_disconnects_mid_stream(server, server_tmp):
    """A streaming client goes away after a few chunks: the server stops that generation and frees its slot."""
    conn = http.client.HTTPConnection(server, timeout=60)
    conn.request("POST", "/completion", body=json.dumps({"prompt": "Once upon a time", "n_predict": 10**6,
                                                          "ignore_eos": True, "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    chunks = 0
    while chunks < 3:
        if r.readline().startswith(b"data: "):
            chunks += 1
    conn.sock.close()  # hang up without reading the rest
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        status, body = request(server, "GET", "/slots", headers=admin_headers(server_tmp, server))  # admin route
        if status == 200 and not any(s.get("is_processing") for s in json.loads(body)):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the abandoned generation kept its slot busy for 30 s")
    assert_still_serving(server)


def test_stop_then_start_again_and_a_second_serve_on_the_busy_port(gguf, tmp_path):
    """`make stop` + `make serve-bg` restarts cleanly on the same port; a second `make serve` there while it runs
    fails with one clear line and leaves the first server serving."""
    port, pid = free_port(), tmp_path / "server.pid"
    common = ("--model", gguf, "--port", port, "--engine", "llama-server", "--llama-server", LLAMA_SERVER,
              "--log", tmp_path / "server.log")
    try:
        for _ in range(2):
            run_script("serve.py", "start", "--background", "--pid-file", pid, *common)
            assert_still_serving(f"127.0.0.1:{port}")
            run_script("serve.py", "stop", "--pid-file", pid)
            assert not pid.exists()
        run_script("serve.py", "start", "--background", "--pid-file", pid, *common)
        second = run_script("serve.py", "start", "--pid-file", tmp_path / "other.pid", *common, check=False)
        assert second.returncode == 1 and f"port {port} on 127.0.0.1 is already in use" in error_line(second)
        assert_still_serving(f"127.0.0.1:{port}")
    finally:
        run_script("serve.py", "stop", "--pid-file", pid, check=False)


def test_backend_sampling_with_a_new_sampler_each_request(gguf, tmp_path):
    """patches/llama.cpp/0002: each request sets its own sampler chain on its slot (larger k, no top-k, CPU-only
    n_probs, the defaults again) without a full re-reserve; every request must still decode."""
    with running_server(gguf, tmp_path, extra=("--parallel", "2", "--ctx-size", str(2 * CTX),
                                                "--backend-sampling", "on")) as url:
        hostport = url.removeprefix("http://")
        for fields in ({"top_k": 40}, {"top_k": 200}, {"top_k": 0}, {"n_probs": 3}, {}, {"top_k": 5, "seed": 7}):
            status, out = completion(hostport, **fields)
            assert status == 200 and out["tokens_predicted"] == 8, (fields, out)



def test_slots_sampled_together_each_get_their_own_token(gguf, tmp_path):
    """patches/llama.cpp/0004: the slots of one batch are sampled on several threads, then accepted in slot
    order. Greedy requests with n_probs report, from the slot's own logits, the most likely next tokens at each
    step: with 4 requests decoding together, every token drawn must be the most likely one the sampler could
    draw (a token handed to the wrong slot, or drawn from another slot's logits, is not). ignore_eos biases the
    end-of-generation tokens to -inf (the response's own logit_bias lists them) while n_probs reports the raw
    logits, so where the model wants to stop the top token is one that could not be drawn: skipped here."""
    with running_server(gguf, tmp_path, extra=("--parallel", "4", "--ctx-size", str(4 * CTX))) as url:
        hostport = url.removeprefix("http://")
        log = server_log(tmp_path, url)
        threads_line = next(line for line in log.splitlines() if "sampling threads = " in line)
        assert int(threads_line.rsplit("=", 1)[1]) == min(4, os.cpu_count() or 1, 16), threads_line

        results, errors = {}, []

        def client(c: int) -> None:
            try:
                results[c] = completion(hostport, prompt=f"{c} {'wolf ' * c}and the {c}th goose", n_predict=24,
                                        temperature=0, top_k=1, n_probs=8, ignore_eos=True, cache_prompt=False)
            except OSError as e:
                errors.append(repr(e))

        for _ in range(3):
            run_together(client, 4, timeout=300)
            assert not errors and len(results) == 4
            for c, (status, out) in results.items():
                assert status == 200, out
                steps = out["completion_probabilities"]
                assert len(steps) == 24
                banned = {b["token"] for b in out["generation_settings"]["logit_bias"]
                          if b["bias"] is None or b["bias"] == float("-inf")}
                assert banned, out["generation_settings"]["logit_bias"]  # ignore_eos's biases are listed
                drawable = [next(t["id"] for t in s["top_logprobs"] if t["id"] not in banned) for s in steps]
                assert [s["id"] for s in steps] == drawable, c
            results.clear()


def stream_completion(hostport: str, **fields) -> list[dict]:
    """The chunks of one streamed /completion, in the order they came."""
    conn = http.client.HTTPConnection(hostport, timeout=300)
    try:
        conn.request("POST", "/completion", body=json.dumps({**fields, "stream": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()[:300]
        return [json.loads(line[6:]) for line in r if line.startswith(b"data: ")]
    finally:
        conn.close()


def test_results_held_until_the_next_step_arrive_complete_and_in_order(gguf, tmp_path):
    """patches/llama.cpp/0006: each step's streamed tokens are handed to the HTTP threads after the next step is
    launched, a final response at once after them (on by default only with a GPU; forced on here). Streams of
    different lengths decoding together: each gets exactly its own number of tokens, then one final chunk, and
    the server's default on this CPU build is off."""
    with running_server(gguf, tmp_path, extra=("--parallel", "2", "--ctx-size", str(2 * CTX))) as url:
        assert "results sent while the next step runs = off" in server_log(tmp_path, url)
    with running_server(gguf, tmp_path, extra=("--parallel", "4", "--ctx-size", str(4 * CTX)),
                        env={"LLAMA_SERVER_OVERLAP_RESULTS": "1"}) as url:
        hostport = url.removeprefix("http://")
        assert "results sent while the next step runs = on" in server_log(tmp_path, url)
        results, errors = {}, []

        # The server sends no chunk for a token that leaves an incomplete UTF-8 character (a byte token; its
        # bytes go out with the next chunk): 5 of 60 streams of 19 random-model tokens here. Kept to printable
        # ASCII by a grammar, every token gets its own chunk, so a chunk lost or sent late is seen.
        def client(c: int) -> None:
            try:
                results[c] = stream_completion(hostport, prompt=f"{c} geese and {'a wolf ' * c}", n_predict=4 + 5 * c,
                                               ignore_eos=True, cache_prompt=False, grammar="root ::= [ -~]*")
            except (OSError, AssertionError) as e:
                errors.append(repr(e))

        for _ in range(2):
            run_together(client, 4, timeout=300)
            assert not errors and len(results) == 4
            for c, chunks in results.items():
                n_predict = 4 + 5 * c
                assert [ch.get("stop", False) for ch in chunks] == [False] * n_predict + [True], c
                assert [ch["tokens_predicted"] for ch in chunks] == [*range(1, n_predict + 1), n_predict], c
                assert all(len(ch["tokens"]) == 1 for ch in chunks[:-1]), c
            results.clear()
        assert_still_serving(hostport)


@pytest.fixture(scope="module")
def top_k_server(gguf, tmp_path_factory):
    """A server with patch 0007's output top-k forced on (by default it is on only where the model is on a CUDA GPU)."""
    tmp = tmp_path_factory.mktemp("serve-top-k")
    with running_server(gguf, tmp, extra=("--parallel", "4", "--ctx-size", str(4 * CTX)),
                        env={"LLAMA_SERVER_OUTPUT_TOP_K": "64"}) as url:
        assert "output top-k = 64, logits copied where a slot needs them" in server_log(tmp, url)
        yield url.removeprefix("http://")


@pytest.mark.parametrize("which", ["server", "top_k_server"])
def test_top_k_candidates_and_logit_biases_match_the_raw_distribution(which, request):
    """patches/llama.cpp/0005: with top-k first in the chain, the k candidates come straight from the logits row
    (biases applied after a wider cut); with 0007's output top-k on (top_k_server), from the 64 largest logits
    the engine kept. Against the server's own pre-sampling log-probabilities of the same prompt: the candidates
    after top_k 8 (temperature 1, no top-p / min-p) must be the 8 most likely tokens with their softmax, and
    banning the most likely token while raising the 12th by 5 must give the top 8 of those adjusted values."""
    server = request.getfixturevalue(which)
    prompt = "The miller's daughter spun straw into"
    status, raw = completion(server, prompt=prompt, n_predict=1, n_probs=12, cache_prompt=False)
    assert status == 200, raw
    ranked = [(t["id"], t["logprob"]) for t in raw["completion_probabilities"][0]["top_logprobs"]]
    assert len(ranked) == 12

    def candidates(**fields) -> dict[int, float]:
        status, out = completion(server, prompt=prompt, n_predict=1, n_probs=8, post_sampling_probs=True,
                                 top_k=8, top_p=1.0, min_p=0.0, temperature=1.0, cache_prompt=False, **fields)
        assert status == 200, out
        return {t["id"]: t["prob"] for t in out["completion_probabilities"][0]["top_probs"]}

    def expected(values: dict[int, float]) -> dict[int, float]:
        top = sorted(values.items(), key=lambda kv: -kv[1])[:8]
        z = sum(math.exp(v) for _, v in top)
        return {t: math.exp(v) / z for t, v in top}

    def assert_same(got: dict[int, float], want: dict[int, float]) -> None:
        assert set(got) == set(want), (got, want)
        for t in want:
            assert got[t] == pytest.approx(want[t], rel=1e-3, abs=1e-6), (t, got, want)

    assert_same(candidates(), expected(dict(ranked)))
    banned, raised = ranked[0][0], ranked[11][0]
    adjusted = {t: v + 5.0 if t == raised else v for t, v in ranked[1:]}
    assert_same(candidates(logit_bias=[[banned, False], [raised, 5.0]]), expected(adjusted))


def test_output_top_k_kept_by_the_engine_gives_the_same_tokens(gguf, server, top_k_server, tmp_path):
    """patches/llama.cpp/0007: with the output top-k on, sampling starts from the 64 largest logits of each output
    kept by the engine, and a batch in which no busy slot needs its logits row leaves the rows uncopied (top-k
    40 first, EOS banned: none is needed). Seeded requests sent one at a time must give exactly the tokens of
    the default server (top-k off on this CPU build, which copies and scans each row); four at once, one of
    them asking for n_probs (a row needed for that batch), must each get all their tokens, with every drawn
    token among the reported top 40 of its step; and the default on this CPU build is off."""
    with running_server(gguf, tmp_path, extra=("--parallel", "2", "--ctx-size", str(2 * CTX))) as url:
        assert "output top-k = 0, logits copied at every step" in server_log(tmp_path, url)

    def seeded(host: str, c: int, **fields) -> dict:
        status, out = completion(host, prompt=f"{c} geese {'and a wolf ' * c}went", n_predict=24, seed=11 + c,
                                 temperature=0.8, top_k=40, ignore_eos=True, cache_prompt=False,
                                 return_tokens=True, **fields)
        assert status == 200, out
        return out

    for c in range(4):
        assert seeded(top_k_server, c)["tokens"] == seeded(server, c)["tokens"], c

    results, errors = {}, []

    def client(c: int) -> None:
        try:
            results[c] = seeded(top_k_server, c, **({"n_probs": 40} if c == 2 else {}))
        except (OSError, AssertionError) as e:
            errors.append(repr(e))

    for _ in range(2):
        run_together(client, 4, timeout=300)
        assert not errors and len(results) == 4
        # tokens_predicted counts a last token that ends inside a UTF-8 character, which the lists leave out
        assert all(out["tokens_predicted"] == 24 for out in results.values())
        steps = results[2]["completion_probabilities"]
        assert len(steps) >= 23
        assert all(s["id"] in {t["id"] for t in s["top_logprobs"]} for s in steps)
        results.clear()
    assert_still_serving(top_k_server)
