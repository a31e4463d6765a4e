"""Replicas behind HAProxy (serve.py --replicas, lib/replicas.py, lib/balancer.py, lib/supervisor.py) on the tiny
model: requests spread over two engines, keys checked through the balancer, an unhealthy replica taken out, kill -9
under load (retried, restarted, back in), a rolling update under 8 streaming clients with no failed and no mixed
response, a replica on another "machine" (a network namespace)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from helpers import LLAMA_SERVER, ROOT, error_line, free_port, run_script
from lib.common import UserError

pytestmark = needs_llama_cpp
KEY = "sk-test-replicas"
HAPROXY = shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")
needs_haproxy = pytest.mark.skipif(HAPROXY is None, reason="no haproxy (apt-get install haproxy)")


def start(gguf: Path, tmp: Path, *extra, port: int | None = None, check: bool = True):
    """serve.py start --background with replicas on a free port; (hostport, pid file, the process)."""
    port = port or free_port()
    pid_file = tmp / "server.pid"
    proc = run_script("serve.py", "start", "--background", "--model", gguf, "--port", port, "--pid-file", pid_file,
                      "--log", tmp / "server.log", "--engine", "llama-server", "--llama-server", LLAMA_SERVER,
                      "--timeout", 60, "--check-interval-ms", 300, "--parallel", 2, *extra, check=check)
    return f"127.0.0.1:{port}", pid_file, proc


def stop(pid_file: Path) -> None:
    run_script("serve.py", "stop", "--pid-file", pid_file, check=False)


def state(pid_file: Path) -> dict:
    return json.loads((pid_file.with_name("server.replicas") / "state.json").read_text())


def live(pid_file: Path) -> dict:
    """HAProxy's view of each server (status, served, in_flight), through its runtime API."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from lib.balancer import Runtime
    spec = json.loads((pid_file.with_name("server.replicas") / "spec.json").read_text())
    return Runtime(Path(spec["socket"])).servers()


def wait_until(what: str, done, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def request(hostport: str, path: str, body: dict | None = None, key: str | None = KEY,
            headers: dict | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(hostport, timeout=60)
    try:
        conn.request("POST" if body is not None else "GET", path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
                      **(headers or {})})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def stream_chat(hostport: str, max_tokens: int = 12, key: str | None = KEY) -> dict:
    """One streamed chat completion: {models: the "model" of every chunk, got_bytes, error, ttft, seconds}."""
    out = {"models": [], "got_bytes": False, "error": None, "ttft": None}
    start = time.perf_counter()
    conn = http.client.HTTPConnection(hostport, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps({
            "messages": [{"role": "user", "content": "Tell me a tale"}], "max_tokens": max_tokens, "stream": True,
            "temperature": 0}), {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        r = conn.getresponse()
        out["got_bytes"] = True
        if r.status != 200:
            out["error"] = f"HTTP {r.status}"
            return out
        done = False
        for line in r:
            if line.startswith(b"data: [DONE]"):
                done = True
                break
            if line.startswith(b"data: "):
                chunk = json.loads(line[6:])
                out["models"].append(chunk["model"])
                if out["ttft"] is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    out["ttft"] = time.perf_counter() - start
        if not done:
            out["error"] = "stream ended before [DONE]"
    except (OSError, http.client.HTTPException, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    out["seconds"] = time.perf_counter() - start
    return out


class Load:
    """n clients sending requests one after the other until stopped (streamed chat, or one-shot /completion)."""

    def __init__(self, hostport: str, n: int, stream: bool = True):
        self.results: list[dict] = []
        self.lock, self.stopped = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(hostport, stream)) for _ in range(n)]

    def client(self, hostport: str, stream: bool) -> None:
        while not self.stopped.is_set():
            if stream:
                r = stream_chat(hostport)
            else:
                try:
                    status, body = request(hostport, "/completion", {"prompt": "Once upon a time", "n_predict": 16,
                                                                     "ignore_eos": True})
                    r = {"got_bytes": True, "error": None if status == 200 else f"HTTP {status}"}
                except (OSError, http.client.HTTPException, ValueError) as e:  # no answer at all
                    r = {"got_bytes": False, "error": f"{type(e).__name__}: {e}"}
            with self.lock:
                self.results.append(r)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        for t in self.threads:
            t.join(timeout=120)

    def count(self) -> int:
        with self.lock:
            return len(self.results)


def plan_args(tmp_path, **overrides):
    import argparse
    gguf = tmp_path / "m.gguf"
    if not gguf.exists():
        gguf.write_bytes(b"GGUF")
    args = argparse.Namespace(
        model=gguf, host="127.0.0.1", port=8080, alias="lora-ship", gpu_layers="auto", ctx_size=0, parallel="auto",
        backend_sampling="auto", cache_ram="auto", api_key="k", extra_args="", adapters=None, engine="llama-server",
        llamafile=tmp_path / "none", llama_server=LLAMA_SERVER, replicas="auto", remote_replicas="", balancer="auto",
        affinity="on", check_interval_ms=1000, pid_file=tmp_path / "server.pid", log=tmp_path / "server.log",
        timeout=60, max_tokens=1024, make_vars="", web="", open=False, keys_file=None, admin_key_file=None,
        admin_key=None, usage_log=None)
    vars(args).update(overrides)
    return args


def test_plan_one_gpu_each_or_a_share_of_the_cores(monkeypatch, tmp_path, tiny_gguf):
    import serve
    shutil.copy(tiny_gguf, tmp_path / "m.gguf")
    from lib.slots import available_memory, cpu_slots
    from lib import balancer, replicas
    monkeypatch.setattr(balancer, "find_haproxy", lambda: "/usr/sbin/haproxy")
    monkeypatch.setattr(replicas, "cpu_ids", lambda: list(range(16)))
    for module in (serve, replicas):
        monkeypatch.setattr(module, "has_cuda_backend", lambda _: True)
    monkeypatch.setattr(serve, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(replicas, "gpu_ids", lambda: ["0", "1", "2", "3"])
    args = plan_args(tmp_path, remote_replicas="10.0.0.2:8080, [fd00::2]:9000")
    assert replicas.wanted(args, serve)
    spec = replicas.plan(args, serve)
    assert [r["env"] for r in spec["replicas"]] == [{"CUDA_VISIBLE_DEVICES": g} for g in "0123"]
    for r in spec["replicas"]:
        cmd = r["cmd"]
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == str(r["port"])
        assert cmd[cmd.index("-ngl") + 1] == "999" and cmd[cmd.index("--api-key") + 1] == "k"
        assert cmd[cmd.index("-t") + 1] == "4" and r["cpus"] == []
    assert len({r["port"] for r in spec["replicas"]}) == 4
    assert spec["remote"] == [{"name": "remote0", "addr": "10.0.0.2:8080"},
                              {"name": "remote1", "addr": "[fd00::2]:9000"}]
    # GPUs but a CPU build of llama.cpp (or GPU_LAYERS=0): the model is on the CPU, auto is one process
    monkeypatch.setattr(replicas, "has_cuda_backend", lambda _: False)
    assert not replicas.wanted(plan_args(tmp_path), serve)
    assert not replicas.wanted(plan_args(tmp_path, gpu_layers="0"), serve)
    monkeypatch.setattr(replicas, "has_cuda_backend", lambda _: True)
    # a CPU machine: auto is one process, no balancer; N replicas share the cores
    monkeypatch.setattr(replicas, "gpu_ids", lambda: [])
    monkeypatch.setattr(serve, "has_nvidia_gpu", lambda: False)
    assert not replicas.wanted(plan_args(tmp_path), serve)
    assert replicas.wanted(plan_args(tmp_path, balancer="haproxy"), serve)  # one replica behind it: its cost measured
    spec = replicas.plan(plan_args(tmp_path, replicas="2"), serve)
    assert [r["cpus"] for r in spec["replicas"]] == [list(range(8)), list(range(8, 16))]
    assert all(r["env"] == {} and r["cmd"][r["cmd"].index("-t") + 1] == "8" for r in spec["replicas"])
    # serve.py's CPU slots for each replica's share: its 8 cores and half the memory
    slots, per_slot = cpu_slots(tmp_path / "m.gguf", cores=8, memory=available_memory() // 2)
    for r in spec["replicas"]:
        assert r["cmd"][r["cmd"].index("-np") + 1] == str(slots)
        assert r["cmd"][r["cmd"].index("-c") + 1] == str(slots * per_slot)
    with pytest.raises(UserError, match="BALANCER=none serves one process"):
        replicas.wanted(plan_args(tmp_path, replicas="2", balancer="none"), serve)
    # what rolls the replicas over (same layout, other engines): a new adapter for make serve-adapters
    adapters = tmp_path / "adapters"
    adapters.mkdir()
    (adapters / "a.gguf").write_bytes(b"GGUF")
    before = replicas.plan(plan_args(tmp_path, replicas="2", adapters=adapters), serve)
    ports = [r["port"] for r in before["replicas"]]
    assert replicas.engines(replicas.plan(plan_args(tmp_path, replicas="2", adapters=adapters), serve, ports)) == \
        replicas.engines(before)
    (adapters / "b.gguf").write_bytes(b"GGUF")
    after = replicas.plan(plan_args(tmp_path, replicas="2", adapters=adapters), serve, ports)
    assert replicas.layout(after) == replicas.layout(before) and replicas.engines(after) != replicas.engines(before)
    assert replicas.layout(replicas.plan(plan_args(tmp_path, replicas="3"), serve)) != replicas.layout(before)


def test_balancer_config(tmp_path):
    from lib import balancer
    cfg = balancer.render("0.0.0.0", 8080, [("r0", "127.0.0.1:9001", 4), ("remote0", "10.0.0.2:8080", 32)],
                          tmp_path / "s.sock", affinity=False)
    assert "bind 0.0.0.0:8080" in cfg and "balance leastconn" in cfg and "option httpchk GET /health" in cfg
    assert "retry-on conn-failure empty-response response-timeout" in cfg and "option redispatch 1" in cfg
    # no more requests at once than the engine has slots (the rest wait in HAProxy): its /health stays answered
    assert "server r0 127.0.0.1:9001 maxconn 4" in cfg and "server remote0 10.0.0.2:8080 maxconn 32" in cfg
    assert "http-buffer-request" not in cfg and "stick" not in cfg  # nothing buffered without affinity
    with_affinity = balancer.render("127.0.0.1", 8080, [("r0", "127.0.0.1:9001", 4)], tmp_path / "s.sock")
    assert "stick on var(txn.session)" in with_affinity and with_affinity.count("\nbackend ") == 1
    if HAPROXY:  # haproxy itself accepts both
        for text in (cfg, with_affinity):
            (tmp_path / "h.cfg").write_text(text)
            balancer.check_config(HAPROXY, tmp_path / "h.cfg")


def test_stats_socket_fits_haproxy_from_a_deep_folder(tmp_path):
    """HAProxy takes a socket path of at most 97 bytes (CI's pytest folders are longer): a deep state folder's
    socket moves to a short name, and what haproxy says of a bad config reaches the one-line error."""
    from lib import balancer, replicas
    deep = tmp_path / ("d" * 60) / "server.replicas"
    sock = replicas.socket_path(deep)
    assert len(str(sock)) <= 97 and sock == replicas.socket_path(deep)  # short and stable: `make status` finds it
    assert replicas.socket_path(Path("/srv/x")) == Path("/srv/x/haproxy.sock")
    if HAPROXY:
        (tmp_path / "h.cfg").write_text(balancer.render("127.0.0.1", 8080, [("r0", "127.0.0.1:9001", 4)], sock))
        balancer.check_config(HAPROXY, tmp_path / "h.cfg")
        (tmp_path / "h.cfg").write_text(balancer.render("127.0.0.1", 8080, [("r0", "127.0.0.1:9001", 4)],
                                                        deep / "haproxy.sock"))
        with pytest.raises(UserError, match="too long"):
            balancer.check_config(HAPROXY, tmp_path / "h.cfg")


@pytest.fixture
def replicas_pid(tmp_path):
    pid_file = tmp_path / "server.pid"
    yield pid_file
    stop(pid_file)


def pids(pid_file: Path) -> list[int]:
    s = state(pid_file)
    return [s["pid"], s["balancer_pid"]] + [r["pid"] for r in s["replicas"]]


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"  # a zombie awaiting its parent's wait


@needs_haproxy
def test_two_replicas_spread_keys_health_and_status(tiny_gguf, tmp_path, replicas_pid):
    hostport, pid_file, proc = start(tiny_gguf, tmp_path, "--replicas", 2, "--api-key", KEY)
    assert "starting 2 replica(s) behind haproxy" in proc.stdout
    # keys: checked by each engine behind the balancer, exactly as on one server; /health needs none
    assert request(hostport, "/completion", {"prompt": "Hi", "n_predict": 2}, key=None)[0] == 401
    assert request(hostport, "/completion", {"prompt": "Hi", "n_predict": 2}, key="sk-wrong")[0] == 401
    assert request(hostport, "/health", key=None)[0] == 200
    # requests spread over both (least outstanding requests)
    threads = [threading.Thread(target=request, args=(hostport, "/completion", {
        "prompt": "Once upon a time", "n_predict": 24, "ignore_eos": True})) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = {name: s["served"] for name, s in live(pid_file).items()}
    assert served["r0"] >= 2 and served["r1"] >= 2, served
    # the stream comes through as it is made: its first token well before its end
    r = stream_chat(hostport, max_tokens=48)
    assert r["error"] is None and r["ttft"] is not None and r["ttft"] < r["seconds"], r
    # make status: each replica's state, model, uptime, requests served
    status = run_script("serve.py", "status", "--pid-file", pid_file).stdout
    for name in ("r0", "r1"):
        line = next(l for l in status.splitlines() if l.strip().startswith(name + " "))
        assert " UP " in line and tiny_gguf.name in line and f" {live(pid_file)[name]['served']} " in line, status
    # an unhealthy replica (stopped: its /health no longer answers) is taken out; the other serves everything
    r0 = state(pid_file)["replicas"][0]["pid"]
    os.kill(r0, signal.SIGSTOP)
    try:
        wait_until("r0 DOWN", lambda: live(pid_file)["r0"]["status"].startswith("DOWN"), 15)
        before = live(pid_file)
        for _ in range(4):
            assert request(hostport, "/completion", {"prompt": "Hi", "n_predict": 2})[0] == 200
        after = live(pid_file)
        assert after["r1"]["served"] == before["r1"]["served"] + 4 and after["r0"]["served"] == before["r0"]["served"]
    finally:
        os.kill(r0, signal.SIGCONT)
    wait_until("r0 UP again", lambda: live(pid_file)["r0"]["status"] == "UP", 15)
    everything = pids(pid_file)
    stop(pid_file)
    wait_until("every process gone", lambda: all(gone(p) for p in everything), 15)


@needs_haproxy
def test_kill_9_under_load_retries_what_had_no_answer_and_the_replica_comes_back(tiny_gguf, tmp_path,
                                                                                  replicas_pid):
    hostport, pid_file, _ = start(tiny_gguf, tmp_path, "--replicas", 2, "--api-key", KEY)
    victim = state(pid_file)["replicas"][0]["pid"]
    with Load(hostport, 3, stream=True) as streams, Load(hostport, 3, stream=False) as oneshots:
        wait_until("some load", lambda: streams.count() >= 3 and oneshots.count() >= 3)
        os.kill(victim, signal.SIGKILL)
        wait_until("r0 restarted", lambda: state(pid_file)["replicas"][0]["restarts"] == 1
                   and state(pid_file)["replicas"][0]["status"] == "up", 30)
        wait_until("r0 back in the balancer", lambda: live(pid_file)["r0"]["status"] == "UP", 15)
        served = live(pid_file)["r0"]["served"]
        wait_until("r0 serving again", lambda: live(pid_file)["r0"]["served"] > served + 2, 30)
    failed = [r for r in streams.results + oneshots.results if r["error"]]
    # only streams already running on the killed replica may fail: every request that had no byte of answer
    # was retried on the other one
    assert all(r["got_bytes"] for r in failed), failed
    assert all(r["error"] == "stream ended before [DONE]" or "IncompleteRead" in r["error"] for r in failed), failed
    assert not [r for r in oneshots.results if r["error"]], failed
    assert len(failed) <= 2 and len(streams.results) + len(oneshots.results) > 20
    print(f"kill -9 under 6 clients: {len(failed)} running stream(s) failed, "
          f"{len(streams.results) + len(oneshots.results) - len(failed)} requests ok")
    assert f"r0 (pid {victim}) exited with code -9; restarting" in (tmp_path / "server-supervisor.log").read_text()


@needs_haproxy
def test_rolling_update_under_8_streaming_clients(tiny_gguf, tmp_path, replicas_pid):
    """A new GGUF (another file, served under another name): replaced one replica at a time under a steady load;
    no request fails, none is refused, every stream is wholly the old model's or wholly the new one's."""
    hostport, pid_file, _ = start(tiny_gguf, tmp_path, "--replicas", 2, "--api-key", KEY, "--alias", "v1")
    new = tmp_path / "new.gguf"
    shutil.copy(tiny_gguf, new)
    with Load(hostport, 8) as load:
        wait_until("some load", lambda: load.count() >= 8)
        proc = start(new, tmp_path, "--replicas", 2, "--api-key", KEY, "--alias", "v2",
                     port=int(hostport.split(":")[1]))[2]
        seen = load.count()
        wait_until("requests after the update", lambda: load.count() >= seen + 16)
    assert "rolling update to" in proc.stdout and "r0: draining" in proc.stdout and "r1: draining" in proc.stdout
    results = load.results
    assert [r for r in results if r["error"]] == [], [r for r in results if r["error"]][:3]
    models = [set(r["models"]) for r in results]
    assert all(len(m) == 1 for m in models), [m for m in models if len(m) != 1]  # never mixed
    order = [m.pop() for m in models]
    assert order.count("v1") >= 8 and order.count("v2") >= 16
    assert set(order[-8:]) == {"v2"}
    s = state(pid_file)
    assert s["generation"] == 2 and all(Path(r["model"]) == new.resolve() for r in s["replicas"])
    print(f"rolling update under 8 streaming clients: {len(results)} requests, 0 failed, "
          f"{order.count('v1')} old, {order.count('v2')} new")


@needs_haproxy
def test_missing_balancer_is_one_line(tiny_gguf, tmp_path):
    proc = run_script("serve.py", "start", "--background", "--model", tiny_gguf, "--port", free_port(), "--pid-file",
                      tmp_path / "pid", "--llama-server", LLAMA_SERVER, "--replicas", 2, check=False,
                      env={"LORA_SHIP_HAPROXY": str(tmp_path / "none")})
    assert proc.returncode == 1
    assert error_line(proc) == "serve.py: error: no load balancer: haproxy is not installed (apt-get install haproxy)"
    bad = run_script("serve.py", "start", "--model", tiny_gguf, "--replicas", "two", check=False)
    assert error_line(bad) == "serve.py: error: REPLICAS must be a number of at least 1 or auto, not 'two'"
    bad = run_script("serve.py", "start", "--model", tiny_gguf, "--remote-replicas", "10.0.0.2", check=False)
    assert error_line(bad) == "serve.py: error: REMOTE_REPLICAS: '10.0.0.2' is not host:port"


@pytest.fixture
def namespace():
    """A network namespace joined to this one by a veth pair: (its name, the address inside, the address here)."""
    tag = uuid.uuid4().hex[:6]
    ns, here, there = f"ls-{tag}", f"lsh{tag}", f"lsn{tag}"
    subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
    steps = [["ip", "netns", "add", ns], ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
             ["ip", "link", "set", there, "netns", ns], ["ip", "addr", "add", f"{subnet}.1/24", "dev", here],
             ["ip", "link", "set", here, "up"], ["ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", there],
             ["ip", "-n", ns, "link", "set", there, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]]
    try:
        if not shutil.which("ip"):
            pytest.skip("no ip command to make a network namespace (apt-get install iproute2)")
        for step in steps:
            r = subprocess.run(step, capture_output=True, text=True)
            if r.returncode != 0:
                pytest.skip(f"cannot make a network namespace ({' '.join(step[:3])}: {r.stderr.strip()}; "
                            f"needs root and iproute2)")
        yield ns, f"{subnet}.2", f"{subnet}.1"
    finally:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@needs_haproxy
def test_a_replica_on_another_machine(tiny_gguf, tmp_path, namespace, replicas_pid):
    """`make serve-replica` on "another machine" (a network namespace: its own address, no loopback shared with
    this one), bound to its address with its key, joins one local replica through REMOTE_REPLICAS."""
    ns, there, _ = namespace
    remote_pid = tmp_path / "remote" / "server.pid"
    remote_pid.parent.mkdir()
    proc = subprocess.run(["ip", "netns", "exec", ns, sys.executable, ROOT / "scripts" / "serve.py", "start",
                           "--background", "--model", tiny_gguf, "--host", there, "--port", "8080", "--api-key", KEY,
                           "--pid-file", remote_pid, "--log", tmp_path / "remote" / "server.log", "--engine",
                           "llama-server", "--llama-server", LLAMA_SERVER, "--replicas", "1", "--balancer", "none"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    try:
        engine = json.loads(remote_pid.read_text())["pid"]  # another network namespace than this one's
        assert os.readlink(f"/proc/{engine}/ns/net") != os.readlink("/proc/self/ns/net")
        hostport, pid_file, _ = start(tiny_gguf, tmp_path, "--replicas", 1, "--api-key", KEY, "--remote-replicas",
                                      f"{there}:8080")
        wait_until("the remote replica UP", lambda: live(pid_file)["remote0"]["status"] == "UP", 15)
        assert request(hostport, "/completion", {"prompt": "Hi", "n_predict": 2}, key=None)[0] == 401
        threads = [threading.Thread(target=request, args=(hostport, "/completion", {
            "prompt": "Once upon a time", "n_predict": 24, "ignore_eos": True})) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        served = {name: s["served"] for name, s in live(pid_file).items()}
        assert served["r0"] >= 1 and served["remote0"] >= 1, served
        assert "prompt eval time" in (tmp_path / "remote" / "server.log").read_text()  # it did the work
        status = run_script("serve.py", "status", "--pid-file", pid_file).stdout
        assert any(l.split()[:3] == ["remote0", f"{there}:8080", "UP"] for l in status.splitlines()), status
    finally:
        run_script("serve.py", "stop", "--pid-file", remote_pid, check=False)


@needs_haproxy
def test_one_conversation_stays_on_one_replica(tiny_gguf, tmp_path, replicas_pid):
    """Affinity: the requests of one conversation (X-Session-Id, or the JSON "user" field) all go to one replica
    while it is up, and move to another when it is down; requests without a name still spread."""
    hostport, pid_file, _ = start(tiny_gguf, tmp_path, "--replicas", 2)

    def where(send) -> dict:
        before = live(pid_file)
        send()
        after = live(pid_file)
        return {name: after[name]["served"] - before[name]["served"] for name in after if
                after[name]["served"] != before[name]["served"]}

    body = {"prompt": "Once upon a time", "n_predict": 2}
    by_header = {name: where(lambda: [request(hostport, "/completion", body, headers={"X-Session-Id": name})
                                      for _ in range(5)]) for name in ("alice", "bob", "carol", "dave")}
    assert all(len(d) == 1 and sum(d.values()) == 5 for d in by_header.values()), by_header
    assert len({next(iter(d)) for d in by_header.values()}) == 2, by_header  # different conversations: both used
    by_user = where(lambda: [request(hostport, "/v1/chat/completions", {
        "user": "erin", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}) for _ in range(5)])
    assert len(by_user) == 1 and sum(by_user.values()) == 5, by_user
    unnamed = where(lambda: [request(hostport, "/completion", body) for _ in range(6)])
    assert len(unnamed) == 2, unnamed  # least outstanding requests: with none in flight, in turn
    # the conversation's replica goes down: it moves to the other one and stays there
    home = next(iter(by_header["alice"]))
    victim = next(r for r in state(pid_file)["replicas"] if r["name"] == home)["pid"]
    os.kill(victim, signal.SIGSTOP)
    try:
        wait_until(f"{home} DOWN", lambda: live(pid_file)[home]["status"].startswith("DOWN"), 15)
        moved = where(lambda: [request(hostport, "/completion", body, headers={"X-Session-Id": "alice"})
                               for _ in range(3)])
        assert len(moved) == 1 and home not in moved, moved
    finally:
        os.kill(victim, signal.SIGCONT)
