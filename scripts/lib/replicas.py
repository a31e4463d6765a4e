"""N engine processes behind a load balancer: how many, where each runs, and serve.py's start/status for them.

`serve.py start --replicas N` (N > 1, `auto` = one per GPU, or any --remote-replicas, or --balancer haproxy)
plans N llama-server processes on loopback ports, each on its own GPU (CUDA_VISIBLE_DEVICES) or its own share
of the CPU cores (-t/-tb threads, pinned to those cores), writes that plan as a spec file and starts the
supervisor (lib/supervisor.py) in the background, which starts the engines and HAProxy (lib/balancer.py) on
HOST:PORT and keeps them running. The pid file then records the supervisor (`make stop` ends it and it ends
everything it started). Running start again with another model or other engine flags, same layout, rolls the
replicas over one at a time (the supervisor does it on SIGHUP); another layout restarts the whole set.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, UserError, has_cuda_backend, log

SUPERVISOR = Path(__file__).with_name("supervisor.py")


def gpu_ids() -> list[str]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES where set, else nvidia-smi's list."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip()]
    try:
        r = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if r.returncode != 0:
        return []
    return [str(i) for i, line in enumerate(r.stdout.splitlines()) if line.startswith("GPU ")]


def cpu_ids() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def count(replicas: str, gpus: list[str]) -> int:
    """REPLICAS: a number, or auto (one per GPU; 1 without one)."""
    if replicas == "auto":
        return max(1, len(gpus))
    if not replicas.isdigit() or int(replicas) < 1:
        raise UserError(f"REPLICAS must be a number of at least 1 or auto, not {replicas!r}")
    return int(replicas)


def remote_list(spec: str) -> list[str]:
    """REMOTE_REPLICAS: host:port,... ([v6]:port for IPv6)."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UserError(f"REMOTE_REPLICAS: {item!r} is not host:port")
        out.append(item)
    return out


def wanted(args, serve) -> bool:
    """Whether this start runs replicas behind the balancer (else today's one process)."""
    if args.balancer not in ("auto", "haproxy", "none"):
        raise UserError(f"BALANCER must be auto, haproxy or none, not {args.balancer!r}")
    n = count(args.replicas, engine_and_gpus(args, serve)[2] if args.replicas == "auto" else [])
    remote = remote_list(args.remote_replicas)
    if args.balancer == "none":
        if n > 1 or remote:
            raise UserError("BALANCER=none serves one process: REPLICAS and REMOTE_REPLICAS need the balancer")
        return False
    return n > 1 or bool(remote) or args.balancer == "haproxy"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def state_dir(pid_file: Path) -> Path:
    return pid_file.with_name(pid_file.stem + ".replicas")


def socket_path(folder: Path) -> Path:
    """The stats socket: in the state folder unless that path is too long for HAProxy (it takes at most 97
    bytes, less than a unix socket's 108: a deep checkout or pytest folder exceeds it)."""
    path = folder.resolve() / "haproxy.sock"
    if len(str(path).encode()) <= 97:
        return path
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"lora-ship-{digest}.sock"


def plan(args, serve, ports: list[int] | None = None) -> dict:
    """The spec the supervisor runs: each replica's command, environment and CPU cores, the balancer's address."""
    from .balancer import find_haproxy
    haproxy = find_haproxy()
    engine, binary, gpus = engine_and_gpus(args, serve)
    on_gpu = bool(gpus)
    n = count(args.replicas, gpus)
    cpus = cpu_ids()
    share = max(1, len(cpus) // n)
    ports = ports or [free_port() for _ in range(n)]
    log_base = Path(args.log)
    mine_only = {}
    if not on_gpu and args.parallel == "auto" and engine == "llama-server":
        # serve.py's CPU slots (lib/slots.py) for this replica's share of the cores and of the memory
        from .slots import available_memory, cpu_slots
        memory = available_memory()
        slots, per_slot = cpu_slots(Path(args.model), cores=share, memory=memory // n if memory else None)
        ctx = "" if str(args.ctx_size) in ("auto", "0", "") else str(args.ctx_size)
        mine_only = {"parallel": str(slots), "ctx_size": ctx or str(slots * per_slot)}
    replicas = []
    for i in range(n):
        engine_args = type(args)(**{**vars(args), "host": "127.0.0.1", "port": ports[i], **mine_only})
        cmd = serve.server_command(engine_args, engine, binary)
        mine = [cpus[(i * share + k) % len(cpus)] for k in range(share)]
        extra = shlex.split(args.extra_args)
        if engine == "llama-server" and not {"-t", "--threads"} & set(extra):
            cmd += ["-t", str(share), "-tb", str(share)]
        env = {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if on_gpu else {}
        replicas.append({"name": f"r{i}", "port": ports[i], "cmd": cmd, "env": env,
                         "cpus": [] if on_gpu else mine, "model": str(Path(args.model).resolve()),
                         "model_mtime": Path(args.model).stat().st_mtime, "adapters": adapter_stamps(args),
                         "settings": serve.settings_key(args),
                         "log": str(log_base.with_name(f"{log_base.stem}-r{i}{log_base.suffix}").resolve())})
    remote = [{"name": f"remote{i}", "addr": addr} for i, addr in enumerate(remote_list(args.remote_replicas))]
    folder = state_dir(args.pid_file).resolve()
    return {"bind": [args.host, args.port], "haproxy": haproxy, "affinity": args.affinity == "on",
            "replicas": replicas, "remote": remote, "dir": str(folder), "socket": str(socket_path(folder)),
            "timeout": args.timeout, "check_interval_ms": args.check_interval_ms,
            "balancer_log": str(log_base.with_name(f"{log_base.stem}-balancer{log_base.suffix}").resolve()),
            "supervisor_log": str(log_base.with_name(f"{log_base.stem}-supervisor{log_base.suffix}").resolve())}


def adapter_stamps(args) -> list:
    """Each adapter file served and its mtime: one exported again in place also rolls the replicas over."""
    if not args.adapters:
        return []
    return [[str(f), f.stat().st_mtime] for f in sorted(Path(args.adapters).glob("*.gguf"))]


def layout(spec: dict) -> list:
    """What a rolling update cannot change: the address, the replicas and their ports, the remote ones."""
    return [spec["bind"], [r["port"] for r in spec["replicas"]], spec["remote"], spec["affinity"]]


def engines(spec: dict) -> list:
    """What a rolling update changes: each replica's settings as asked for (serve.py's settings_key: not what
    auto made of them, which follows the free memory), environment, model file and adapter files."""
    return [[r.get("settings"), r["env"], r["model"], r["model_mtime"], r.get("adapters")] for r in spec["replicas"]]


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def start(args, serve) -> None:
    """serve.py start with replicas: start them, roll them over to a new model, or say they already serve it."""
    running = serve.read_pid(args.pid_file) if args.pid_file else None
    if running and running.get("replicas"):
        folder = Path(running["replicas"])
        old = read_json(folder / "spec.json") or {}
        state = read_json(folder / "state.json") or {}
        ports = [r["port"] for r in old.get("replicas", [])]
        spec = plan(args, serve, ports if len(ports) == count(args.replicas, engine_and_gpus(args, serve)[2]) else None)
        if old and layout(old) == layout(spec) and state.get("phase") in ("ready", "failed-rollout"):
            if engines(old) == engines(spec):
                log(f"already serving {args.model} on {args.host}:{args.port} with {len(ports)} replica(s) "
                    f"(supervisor pid {running['pid']})")
                return
            return rollout(args, spec, old, running, serve)
        log(f"restarting the replicas (supervisor pid {running['pid']}) with another layout")
        serve.stop(args)
    elif running:
        log(f"replacing the single server (pid {running['pid']}) with replicas")
        serve.stop(args)
    spec = plan(args, serve)
    if serve.port_in_use(args.host, args.port):
        raise UserError(f"port {args.port} on {args.host} is already in use; stop what uses it or choose PORT=...")
    folder = Path(spec["dir"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "state.json").unlink(missing_ok=True)
    spec["generation"] = 1
    write_json(folder / "spec.json", spec)
    sup_log = Path(spec["supervisor_log"])
    sup_log.parent.mkdir(parents=True, exist_ok=True)
    n, remote = len(spec["replicas"]), len(spec["remote"])
    log(f"starting {n} replica(s){f' + {remote} remote' if remote else ''} behind haproxy on "
        f"{args.host}:{args.port} (logs: {sup_log.parent}/{Path(args.log).stem}-*.log)")
    with open(sup_log, "ab") as logf:
        proc = subprocess.Popen([sys.executable, str(SUPERVISOR), "--spec", str(folder / "spec.json")],
                                stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=args.background, cwd=ROOT)
    try:
        state = wait_phase(proc, folder, 1, args.timeout * 2 + 30, sup_log)
    except BaseException:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=20)
        raise
    record = {"pid": proc.pid, "host": args.host, "port": args.port, "model": str(Path(args.model).resolve()),
              "model_mtime": Path(args.model).stat().st_mtime, "adapters": serve.adapters_key(args),
              "replicas": str(folder)}
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}"
    check_front(url, proc, serve, args.api_key)
    if args.pid_file:
        write_json(args.pid_file, record)
    # each engine serves the chat page at / (serve.py's --web), so the balancer does too
    page = spec["replicas"][0]["cmd"][0].endswith("llamafile") or serve.web_folder(args) is not None
    if getattr(args, "open", False) and page:
        import webbrowser
        webbrowser.open(url + "/")
    serve.print_usage(url, args.api_key, page)
    print_table(state, None)
    if args.background:
        log(f"running in the background (supervisor pid {proc.pid}); '{serve.make_hint('status', args)}' shows "
            f"the replicas, '{serve.make_hint('stop', args)}' ends them")
        return
    log("serving in the foreground; press Ctrl-C to stop")
    serve.wait_in_foreground(proc, args.pid_file, grace=30)  # the supervisor stops its replicas first


def engine_and_gpus(args, serve) -> tuple[str, Path, list[str]]:
    """The engine serve.py would run, its binary, and the GPUs the replicas go on (none: the model on the CPU)."""
    engine, binary = serve.pick_engine("llama-server" if args.adapters else args.engine, args.llamafile,
                                       args.llama_server)
    gpus = gpu_ids()
    on_gpu = bool(gpus) and args.gpu_layers != "0" and (engine == "llamafile" or has_cuda_backend(binary.parent))
    return engine, binary, gpus if on_gpu else []


def check_front(url: str, proc: subprocess.Popen, serve, api_key: str | None) -> None:
    """One real request through the balancer (serve.py's ready check: the tokenizer and a one-token chat)."""
    try:
        serve.check_answers(url, api_key)
    except UserError:
        proc.terminate()
        proc.wait(timeout=20)
        raise


def wait_phase(proc: subprocess.Popen | None, folder: Path, generation: int, timeout: float, sup_log: Path,
               pid: int | None = None, seen: set | None = None) -> dict:
    """Wait until the supervisor reports `generation` ready; print each of its events once (not those in seen)."""
    deadline = time.monotonic() + timeout
    seen = set(seen or ())
    while time.monotonic() < deadline:
        state = read_json(folder / "state.json") or {}
        for note in state.get("events", []):
            if note not in seen:
                seen.add(note)
                log(note)
        if state.get("generation") == generation and state.get("phase") in ("ready", "failed", "failed-rollout"):
            if state["phase"] != "ready":
                show_tail(sup_log)
                raise UserError(state.get("error") or f"the replicas did not start (log: {sup_log})")
            return state
        alive = proc.poll() is None if proc else _alive(pid)
        if not alive:
            show_tail(sup_log)
            raise UserError(state.get("error") or f"the supervisor exited before the replicas were ready "
                                                   f"(log: {sup_log})")
        time.sleep(0.2)
    raise UserError(f"the replicas were not ready within {timeout:.0f} s (log: {sup_log})")


def _alive(pid: int | None) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (OSError, TypeError, ValueError):
        return False


def show_tail(path: Path, n: int = 15) -> None:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return
    print(f"--- last lines of {path} ---\n" + "\n".join(lines) + "\n---", file=sys.stderr)


def rollout(args, spec: dict, old: dict, running: dict, serve) -> None:
    """Hand the supervisor the new spec and wait while it replaces the replicas one at a time."""
    folder = Path(spec["dir"])
    spec["generation"] = old.get("generation", 1) + 1
    write_json(folder / "spec.json", spec)
    log(f"rolling update to {args.model}: {len(spec['replicas'])} replica(s), one at a time (drain, restart, "
        f"health, rejoin)")
    before = set((read_json(folder / "state.json") or {}).get("events", []))
    os.kill(int(running["pid"]), signal.SIGHUP)
    start = time.monotonic()
    state = wait_phase(None, folder, spec["generation"], (args.timeout + 600) * len(spec["replicas"]),
                       Path(spec["supervisor_log"]), pid=running["pid"], seen=before)
    write_json(args.pid_file, {**running, "model": str(Path(args.model).resolve()),
                               "model_mtime": Path(args.model).stat().st_mtime, "adapters": serve.adapters_key(args)})
    log(f"rolling update done in {time.monotonic() - start:.1f} s")
    print_table(state, None)


def replica_rows(state: dict, live: dict | None) -> list[list[str]]:
    now = time.time()
    rows = []
    for r in state.get("replicas", []) + state.get("remote", []):
        s = (live or {}).get(r["name"], {})
        started = r.get("started")
        uptime = _duration(now - started) if started else "-"
        rows.append([r["name"], r.get("addr") or f"127.0.0.1:{r['port']}", s.get("status") or r.get("status", "?"),
                     Path(r["model"]).name if r.get("model") else "(remote)", uptime,
                     str(s.get("served", "-")), str(s.get("in_flight", "-")), str(r.get("restarts", "-")),
                     r.get("where", "")])
    return rows


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def print_table(state: dict, live: dict | None) -> None:
    head = ["replica", "address", "state", "model", "uptime", "served", "in flight", "restarts", "where"]
    rows = [head] + replica_rows(state, live)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip(), flush=True)


def status(record: dict) -> None:
    """make status for replicas: each one's state (HAProxy's view), model, uptime, requests served."""
    from .balancer import Runtime
    folder = Path(record["replicas"])
    state = read_json(folder / "state.json") or {}
    spec = read_json(folder / "spec.json") or {}
    try:
        live = Runtime(Path(spec.get("socket", folder / "haproxy.sock"))).servers()
    except OSError as e:
        live = None
        log(f"haproxy's stats socket does not answer ({e}); showing the supervisor's view")
    host, port = record["host"], record["port"]
    print(f"balancer: haproxy on {host}:{port} (pid {state.get('balancer_pid', '?')}), supervisor pid "
          f"{record['pid']}, phase {state.get('phase', '?')}, generation {state.get('generation', '?')}")
    print_table(state, live)
