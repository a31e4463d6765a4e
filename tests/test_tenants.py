"""One server, many customers (patches/llama.cpp/0015, serve.py, scripts/keys.py, scripts/usage.py): which key may
call which route, each tenant's models, usage per tenant and model in the log and /metrics, keys read again when
the file changes. One server serves the module: a tiny base with two adapters, a keys file, an API key."""
from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from helpers import (LLAMA_SERVER, admin_headers, error_line, free_port, make_adapter, make_tiny_llama, run_script,
                     running_server, server_log, shared_folder)
from test_adapters import base, base_gguf, checkpoints, exported  # noqa: F401  (the adapters' fixtures)

pytestmark = needs_llama_cpp

API_KEY = "default-key-0123456789"
PROMPT = list(range(200, 232))


@pytest.fixture(scope="module")
def shared(base_gguf, exported, tmp_path_factory):  # noqa: F811
    """A running server: base "tiny", adapters acme-a, acme-b, globex-a; keys for acme (acme-*), globex (globex-*
    and the base), temp (every model, revoked by a test); the API key (tenant "default")."""
    from lib.keys import add_key
    tmp = tmp_path_factory.mktemp("tenants")
    adapters = tmp / "adapters"
    adapters.mkdir()
    for name, source in (("acme-a", "alpha"), ("acme-b", "beta"), ("globex-a", "alpha")):
        shutil.copy(exported[0]["f16"] / f"{source}.gguf", adapters / f"{name}.gguf")
    keys_file = tmp / "keys.txt"
    keys = {t: add_key(keys_file, t, m) for t, m in (("acme", "acme-*"), ("globex", "globex-*,tiny"), ("temp", "*"))}
    usage = tmp / "usage.jsonl"
    extra = ("--adapters", adapters, "--alias", "tiny", "--keys-file", keys_file, "--usage-log", usage,
             "--api-key", API_KEY, "--parallel", "4", "--ctx-size", "8192")
    with running_server(base_gguf["f16"], tmp, extra=extra) as url:
        yield {"url": url, "host": url.removeprefix("http://"), "tmp": tmp, "keys": keys, "keys_file": keys_file,
               "usage": usage, "adapters": adapters, "admin": admin_headers(tmp, url)["Authorization"][7:]}


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory) -> Path:
    """An adapter exported for another base (hidden size 32, not 64): llama.cpp must refuse it on this one."""
    def build(folder):
        model, _ = make_tiny_llama(folder / "base", "spm", seed=7, hidden=32)
        make_adapter(model, folder / "ckpts" / "other", seed=7)
        run_script("export_adapters.py", "--base", folder / "base", "--checkpoints-dir", folder / "ckpts",
                   "--out-dir", folder / "out", "--log", folder / "convert.log")
    return shared_folder(tmp_path_factory, "tenants-other-base", build) / "out" / "other.gguf"


def call(host: str, method: str, path: str, body=None, key: str | None = None, timeout: float = 120):
    conn = http.client.HTTPConnection(host, timeout=timeout)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        r = conn.getresponse()
        data = r.read()
        try:
            return r.status, json.loads(data)
        except ValueError:
            return r.status, data.decode(errors="replace")
    finally:
        conn.close()


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
INFERENCE = [("GET", "/v1/models", None), ("POST", "/v1/chat/completions", {"model": "tiny", **CHAT}),
             ("POST", "/completion", {"prompt": "Hi", "n_predict": 2}), ("POST", "/tokenize", {"content": "Hi"}),
             ("POST", "/v1/embeddings", {"input": "Hi"}), ("GET", "/props", None)]
ADMIN = [("GET", "/metrics", None), ("POST", "/props", {}), ("GET", "/lora-adapters", None),
         ("POST", "/lora-adapters", []), ("POST", "/lora-adapters/load", {"name": "nothing-here"}),
         ("GET", "/slots", None), ("POST", "/slots/0?action=erase", {}), ("POST", "/keys/reload", {})]


def test_every_route_with_no_key_an_inference_key_another_tenants_and_the_admin_key(shared):
    host, keys = shared["host"], shared["keys"]
    assert call(host, "GET", "/health")[0] == 200  # open, for balancers
    for method, path, body in INFERENCE + ADMIN:
        for key in (None, "wrong-key"):
            status, out = call(host, method, path, body, key)
            assert status == 401 and out["error"]["type"] == "authentication_error", (path, key, out)
    for method, path, body in INFERENCE:
        for key in (keys["acme"], keys["globex"], API_KEY, shared["admin"]):
            assert call(host, method, path, body, key)[0] not in (401, 403), (path, key)
    for method, path, body in ADMIN:
        for key in (keys["acme"], keys["globex"], API_KEY):
            status, out = call(host, method, path, body, key)
            assert status == 403 and list(out) == ["error"], (path, out)  # one JSON error
            assert out["error"]["message"] == "this route needs the admin key"
        status, _ = call(host, method, path, body, shared["admin"])
        assert status not in (401, 403), path


def test_admin_routes_are_off_without_an_admin_key_on_loopback_too(tiny_gguf, tmp_path):
    port = free_port()
    proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(tiny_gguf), "--port", str(port), "-c", "512", "-np", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        host = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if call(host, "GET", "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        assert call(host, "GET", "/v1/models")[0] == 200  # no keys at all: inference stays open
        for method, path, body in ADMIN:
            status, out = call(host, method, path, body)
            assert status == 403 and "has none" in out["error"]["message"], (path, out)
    finally:
        proc.terminate()
        proc.wait(30)


def test_adapters_load_by_name_from_the_folder_never_a_path(shared, base_gguf, other_base_adapter):  # noqa: F811
    host, admin = shared["host"], shared["admin"]
    outside = shared["tmp"] / "outside.gguf"
    shutil.copy(shared["adapters"] / "acme-a.gguf", outside)
    for body in ({"name": "../outside"}, {"name": str(outside)}, {"name": "/etc/passwd"}, {"name": "a/b"},
                 {"name": "acme-a\u0000x"}, {"name": ".."}, {"name": ""}, {"name": "nothing-here"},
                 {"path": str(outside)}, {"name": "acme-a", "path": str(outside)}, {"name": 3}):
        status, out = call(host, "POST", "/lora-adapters/load", body, admin)
        assert status == 400 and out["error"]["type"] == "invalid_request_error", (body, out)
    shutil.copy(base_gguf["f16"], shared["adapters"] / "not-lora.gguf")  # a model, not an adapter
    shutil.copy(other_base_adapter, shared["adapters"] / "other-base.gguf")
    for name in ("not-lora", "other-base"):
        status, out = call(host, "POST", "/lora-adapters/load", {"name": name}, admin)
        assert status == 400 and "failed to load LoRA adapter" in out["error"]["message"], out
        assert call(host, "GET", "/health")[0] == 200
        (shared["adapters"] / f"{name}.gguf").unlink()
    shutil.copy(shared["adapters"] / "acme-b.gguf", shared["adapters"] / "acme-late.gguf")
    status, out = call(host, "POST", "/lora-adapters/load", {"name": "acme-late"}, admin)
    assert status == 200 and out["name"] == "acme-late"
    _, models = call(host, "GET", "/v1/models", key=shared["keys"]["acme"])
    assert "acme-late" in [m["id"] for m in models["data"]]
    status, out = call(host, "POST", "/v1/chat/completions", {"model": "acme-late", **CHAT}, shared["keys"]["acme"])
    assert status == 200 and out["model"] == "acme-late"


def test_hot_add_of_serve_py_uses_the_owner_only_admin_key(shared):
    key_file = shared["tmp"] / f"server-{shared['url'].rsplit(':', 1)[1]}.admin.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    shutil.copy(shared["adapters"] / "acme-a.gguf", shared["adapters"] / "acme-hot.gguf")
    port = shared["url"].rsplit(":", 1)[1]
    running = json.loads((shared["tmp"] / f"server-{port}.pid").read_text())
    proc = run_script("serve.py", "start", "--background", "--model", running["model"], "--port", port,
                      "--pid-file", shared["tmp"] / f"server-{port}.pid", "--engine", "llama-server",
                      "--llama-server", LLAMA_SERVER, "--adapters", shared["adapters"], "--alias", "tiny",
                      "--keys-file", shared["keys_file"], "--usage-log", shared["usage"], "--api-key", API_KEY,
                      "--parallel", "4", "--ctx-size", "8192")
    assert "loaded acme-hot" in proc.stdout
    _, models = call(shared["host"], "GET", "/v1/models", key=shared["keys"]["acme"])
    assert "acme-hot" in [m["id"] for m in models["data"]]


def test_each_key_sees_and_uses_only_its_own_models(shared):
    host, keys = shared["host"], shared["keys"]
    ids = lambda key: [m["id"] for m in call(host, "GET", "/v1/models", key=key)[1]["data"]]  # noqa: E731
    assert ids(keys["acme"])[:2] == ["acme-a", "acme-b"] and all(i.startswith("acme-") for i in ids(keys["acme"]))
    assert ids(keys["globex"]) == ["tiny", "globex-a"]
    assert ids(API_KEY)[:4] == ["tiny", "acme-a", "acme-b", "globex-a"]

    def refusal(key: str, model: str) -> tuple[int, dict]:
        return call(host, "POST", "/v1/chat/completions", {"model": model, **CHAT}, key)

    # another tenant's adapter is answered exactly as a name that does not exist
    other, unknown = refusal(keys["acme"], "globex-a"), refusal(keys["acme"], "globex-b")
    assert other[0] == unknown[0] == 404
    assert other[1] == json.loads(json.dumps(unknown[1]).replace("globex-b", "globex-a"))
    assert "globex" not in other[1]["error"]["message"].split("has:")[1] and "tiny" not in other[1]["error"]["message"]
    assert refusal(keys["acme"], "tiny")[0] == 404  # the base is not acme's either
    status, out = call(host, "POST", "/completion", {"prompt": "Hi", "n_predict": 2}, keys["acme"])  # base by default
    assert status == 404
    assert refusal(keys["globex"], "acme-a")[0] == 404 and refusal(keys["globex"], "tiny")[0] == 200
    status, out = call(host, "POST", "/completion", {"prompt": "Hi", "n_predict": 2, "lora": [{"id": 2, "scale": 1}]},
                       keys["acme"])
    assert status == 400  # no adapters by id for a scoped key
    assert refusal(API_KEY, "globex-a")[0] == 200  # API_KEY alone: one tenant with every model
    refused = [l for l in usage_lines(shared["usage"]) if l["tenant"] == "acme" and l["status"] == 404]
    assert {l["model"] for l in refused} >= {"globex-a", "globex-b", "tiny", ""}  # refusals are logged too


def test_resumable_streams_are_each_tenants_own(shared):
    """A stream kept for replay under X-Conversation-Id (upstream's resumable streams) is its tenant's: another
    tenant's key sending the same id can neither replay, look up, stop nor replace it."""
    host, keys = shared["host"], shared["keys"]
    conv = f"conv-{time.time_ns()}"

    def stream(key: str, model: str) -> str:
        conn = http.client.HTTPConnection(host, timeout=120)
        try:
            conn.request("POST", "/v1/chat/completions", json.dumps({"model": model, "stream": True, **CHAT}),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {key}",
                          "X-Conversation-Id": conv})
            r = conn.getresponse()
            assert r.status == 200
            return r.read().decode()
        finally:
            conn.close()

    def lookup(key: str) -> list:
        status, out = call(host, "POST", "/v1/streams/lookup", {"conversation_ids": [conv]}, key)
        assert status == 200, out
        return out

    told = stream(keys["globex"], "globex-a")
    assert "[DONE]" in told
    mine = lookup(keys["globex"])
    assert [s["conversation_id"] for s in mine] == [conv] and mine[0]["is_done"]  # the id as the client sent it
    replay = call(host, "GET", f"/v1/stream?conv_id={conv}", key=keys["globex"])
    assert replay[0] == 200 and replay[1] == told
    assert lookup(keys["acme"]) == []
    assert call(host, "GET", f"/v1/stream?conv_id={conv}", key=keys["acme"])[0] == 404
    call(host, "DELETE", f"/v1/stream?conv_id={conv}", key=keys["acme"])
    stream(keys["acme"], "acme-a")  # acme's own stream under the same id: a session of its own
    assert lookup(keys["globex"]) == mine
    assert call(host, "GET", f"/v1/stream?conv_id={conv}", key=keys["globex"]) == replay
    assert [s["conversation_id"] for s in lookup(keys["acme"])] == [conv]


def metrics(host: str, admin: str) -> dict:
    status, text = call(host, "GET", "/metrics", key=admin)
    assert status == 200
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(lora_ship_\w+)\{([^}]*)\} (\S+)$', line)
        if m:
            out[(m[1], m[2])] = float(m[3])
    return out


def series(m: dict, name: str, tenant: str, model: str, **more) -> float:
    labels = f'tenant="{tenant}",model="{model}"' + "".join(f',{k}="{v}"' for k, v in more.items())
    return m.get((name, labels), 0.0)


def usage_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_usage_log_and_metrics_equal_what_the_clients_were_told(shared):
    """Mixed tenants, models, one-shot and streamed requests at once, some streams cut off midway: every request is
    one line of the log; the complete ones carry the usage their client got; the counters are the lines' sums. A
    client that leaves once it has the last result (before the closing [DONE]) got all of it: 200, not 499."""
    host, keys, admin = shared["host"], shared["keys"], shared["admin"]
    before_lines, before = len(usage_lines(shared["usage"])), metrics(host, admin)
    jobs = [(keys["acme"], "acme", "acme-a", "oneshot"), (keys["acme"], "acme", "acme-b", "stream"),
            (keys["globex"], "globex", "globex-a", "oneshot"), (keys["globex"], "globex", "tiny", "stream"),
            (API_KEY, "default", "acme-a", "stream"), (API_KEY, "default", "tiny", "oneshot"),
            (keys["acme"], "acme", "acme-a", "abort"), (keys["globex"], "globex", "tiny", "abort"),
            (API_KEY, "default", "globex-a", "abort"), (keys["acme"], "acme", "acme-b", "leave"),
            (API_KEY, "default", "tiny", "leave")] * 2
    got, errors = [], []

    def run(key, tenant, model, kind) -> None:
        try:
            # a cut-off stream has its own prompt, so that its line is known by its prompt's length
            content = "Tell me a long tale about a king and his three daughters" if kind == "abort" else "Tell me a tale"
            body = {"model": model, "messages": [{"role": "user", "content": content}], "temperature": 1,
                    "max_tokens": 16 if kind != "abort" else 4000, "ignore_eos": kind == "abort"}
            if kind == "oneshot":
                status, out = call(host, "POST", "/v1/chat/completions", body, key)
                assert status == 200, out
                got.append((tenant, model, kind, out["usage"], 0))
                return
            conn = http.client.HTTPConnection(host, timeout=120)
            conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True, "stream_options": {
                "include_usage": True}}), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
            r = conn.getresponse()
            assert r.status == 200
            usage, chunks = None, 0
            for line in r:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    chunks += bool(chunk.get("choices"))
                    usage = chunk.get("usage") or usage
                    if kind == "abort" and chunks == 5 or kind == "leave" and usage:
                        break
            conn.sock.close()
            conn.close()
            got.append((tenant, model, kind, usage, chunks))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    deadline = time.monotonic() + 60  # a cut-off stream is written once the server notices
    while len(usage_lines(shared["usage"])) < before_lines + len(jobs) and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = usage_lines(shared["usage"])[before_lines:]
    assert len(lines) == len(jobs)
    whole_prompts = {u["prompt_tokens"] for _, _, k, u, _ in got if k != "abort"}
    cut_off = [l for l in lines if l["prompt_tokens"] not in whole_prompts]
    assert Counter((l["tenant"], l["model"], l["status"]) for l in lines if l not in cut_off) == Counter(
        (t, m, 200) for t, m, k, _, _ in got if k != "abort")
    assert Counter((l["tenant"], l["model"]) for l in cut_off) == Counter((t, m) for t, m, k, _, _ in got if k == "abort")
    # A tiny model can generate its whole answer (up to the slot's context) into the socket's buffers before a
    # client on a busy machine has read 5 chunks: the server then handed on everything, a whole 200. Most leave first.
    slot_ctx = 8192 // 4
    assert all(l["status"] == 499 and 0 < l["completion_tokens"] < slot_ctx - l["prompt_tokens"] - 1 or
               l["status"] == 200 and l["completion_tokens"] >= slot_ctx - l["prompt_tokens"] - 1 for l in cut_off), \
        cut_off
    assert sum(l["status"] == 499 for l in cut_off) >= len(cut_off) // 2, cut_off
    for tenant, model in {(t, m) for t, m, _, _, _ in got}:
        mine = [l for l in lines if (l["tenant"], l["model"]) == (tenant, model)]
        whole = [l for l in mine if l not in cut_off]
        done = [u for t, m, k, u, _ in got if (t, m) == (tenant, model) and k != "abort"]
        assert sum(l["completion_tokens"] for l in whole) == sum(u["completion_tokens"] for u in done)
        assert sum(l["prompt_tokens"] for l in whole) == sum(u["prompt_tokens"] for u in done)
        assert sum(l["cached_prompt_tokens"] for l in whole) == \
            sum(u["prompt_tokens_details"]["cached_tokens"] for u in done)
        cut = [l["completion_tokens"] for l in mine if l in cut_off]  # counted, and stopped when the client left
        received = [c for t, m, k, _, c in got if (t, m) == (tenant, model) and k == "abort"]
        assert sum(cut) >= sum(received) - len(received)  # at least the tokens sent (the first chunk has none)
        after = metrics(host, admin)
        for field in ("prompt_tokens", "cached_prompt_tokens", "completion_tokens"):
            name = f"lora_ship_{field}_total"
            assert series(after, name, tenant, model) - series(before, name, tenant, model) == \
                sum(l[field] for l in mine), (tenant, model, field)
        for status in (200, 499):
            name = "lora_ship_requests_total"
            assert series(after, name, tenant, model, status=status) - series(before, name, tenant, model,
                                                                             status=status) == \
                sum(l["status"] == status for l in mine)
        name = "lora_ship_request_duration_seconds_count"
        assert series(after, name, tenant, model) - series(before, name, tenant, model) == len(mine)
        assert series(after, "lora_ship_request_duration_seconds_bucket", tenant, model, le="+Inf") == \
            series(after, name, tenant, model)
    assert all(0 < l["ttft_ms"] <= l["total_ms"] for l in lines if l["completion_tokens"])
    table = run_script("usage.py", "--log", shared["usage"]).stdout
    everything = usage_lines(shared["usage"])
    row = next(r.split() for r in table.splitlines() if r.split()[:2] == ["acme", "acme-a"])
    assert int(row[2]) == sum((l["tenant"], l["model"]) == ("acme", "acme-a") for l in everything)
    assert int(row[7]) == sum(l["completion_tokens"] for l in everything if (l["tenant"], l["model"]) == ("acme", "acme-a"))


def test_a_revoked_key_is_refused_at_its_next_request_while_its_requests_in_flight_finish(shared):
    from lib.keys import write_private
    host, keys = shared["host"], shared["keys"]
    conn = http.client.HTTPConnection(host, timeout=120)
    conn.request("POST", "/completion", json.dumps({"model": "acme-a", "prompt": PROMPT, "n_predict": 800,
                                                    "ignore_eos": True, "stream": True}),
                 {"Content-Type": "application/json", "Authorization": f"Bearer {keys['temp']}"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")  # generating
    text = shared["keys_file"].read_text()
    write_private(shared["keys_file"], "".join(l for l in text.splitlines(True) if "tenant=temp " not in l))
    assert call(host, "GET", "/v1/models", key=keys["temp"])[0] == 401
    assert call(host, "GET", "/v1/models", key=keys["acme"])[0] == 200
    last = None
    for line in r:
        if line.startswith(b"data: {"):
            last = json.loads(line[6:])
    conn.close()
    assert last["stop"] and last["tokens_predicted"] == 800  # the request in flight went on to its end
    # (whether the engine was still generating when the file changed depends on the machine's speed: a tiny
    # model's 800 tokens can all be in the socket's buffers by then; the key was checked once, at the start)
    temp = lambda: [(l["status"], l["completion_tokens"]) for l in usage_lines(shared["usage"])  # noqa: E731
                    if l["tenant"] == "temp"]
    deadline = time.monotonic() + 10  # written when the response ends, as the connection closes
    while not temp() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert temp() == [(200, 800)]


def test_a_broken_keys_file_keeps_the_last_good_keys_and_names_its_line(shared):
    host, keys, admin = shared["host"], shared["keys"], shared["admin"]
    good = shared["keys_file"].read_text()
    broken = good + "sha256:abc tenant=x models=*\n"
    line = len(broken.splitlines())
    shared["keys_file"].write_text(broken)
    try:
        assert call(host, "GET", "/v1/models", key=keys["acme"])[0] == 200  # the last good keys
        status, out = call(host, "POST", "/keys/reload", {}, admin)
        assert status == 400 and out["error"]["message"].startswith(f"{shared['keys_file']} line {line}: ")
        said = f"keys file {shared['keys_file']} line {line}: expected sha256:<64 hex digits>"
        deadline = time.monotonic() + 10  # the engine's log is written by a thread of its own
        while said not in server_log(shared["tmp"], shared["url"]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert said in server_log(shared["tmp"], shared["url"])
        proc = run_script("keys.py", "reload", "--url", shared["url"], "--admin-key-file",
                          shared["tmp"] / f"server-{shared['url'].rsplit(':', 1)[1]}.admin.key", check=False)
        assert proc.returncode == 1 and f"line {line}" in error_line(proc)
    finally:
        shared["keys_file"].write_text(good)
    from lib.keys import add_key
    new = add_key(shared["keys_file"], "initech", "globex-*")
    status, out = call(host, "GET", "/v1/models", key=new)
    assert status == 200 and [m["id"] for m in out["data"]] == ["globex-a"]


def test_make_key_prints_a_key_once_and_keeps_only_its_hash(tmp_path):
    keys = tmp_path / "keys.txt"
    proc = run_script("keys.py", "add", "--file", keys, "--tenant", "acme", "--models", "acme-*, base")
    key = proc.stdout.splitlines()[0]
    assert key.startswith("lsk-") and len(key) > 40
    text = keys.read_text()
    assert key not in text and keys.stat().st_mode & 0o777 == 0o600
    import hashlib
    assert f"sha256:{hashlib.sha256(key.encode()).hexdigest()} tenant=acme models=acme-*,base" in text
    for bad in (("--tenant", "a b", "--models", "x"), ("--tenant", "acme", "--models", ""),
                ("--tenant", "acme", "--models", "a/b")):
        proc = run_script("keys.py", "add", "--file", keys, *bad, check=False)
        assert proc.returncode == 1 and error_line(proc).startswith("keys.py: error: ")
    assert keys.read_text() == text
