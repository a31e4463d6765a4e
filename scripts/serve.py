#!/usr/bin/env python3
"""Serve a GGUF model over HTTP with llamafile, or llama.cpp's llama-server where no llamafile is at hand.

Both speak the same API: OpenAI-style /v1/chat/completions, llama.cpp's /completion, and /health.
  serve.py start --model m.gguf            foreground; Ctrl-C stops it
  serve.py start --model m.gguf --background --pid-file out/server.pid
  serve.py stop --pid-file out/server.pid
  serve.py start --model m.gguf --replicas 2 --background --pid-file out/server.pid
      N engines behind HAProxy on HOST:PORT, supervised, rolled over one at a time when started again with
      another model (lib/replicas.py, lib/supervisor.py, lib/balancer.py); `serve.py status` shows them
  serve.py start --model base.gguf --adapters out/adapters --background --pid-file out/server.pid
      the base once with every out/adapters/NAME.gguf (llama-server only); a request chooses one by its
      "model" (NAME; the base by --alias), GET /v1/models lists them. Run again after adding adapter files:
      the running server loads the new ones, requests in flight go on.
llama-server also serves the chat page in web/ at / (--path; --web '' turns it off); llamafile shows its own.
Binds 127.0.0.1 by default; any other address needs --api-key or --keys-file (or --allow-no-key, at your own
risk), because the server would otherwise answer anyone who can reach the machine.
llama-server only (patches/llama.cpp/0015): --keys-file gives each tenant's key its models (scripts/lib/keys.py),
the admin routes (adapter loading, /metrics, ...) take only the admin key (ADMIN_KEY, else a new random one),
kept in --admin-key-file (0600) for this project's own admin calls; --usage-log writes one line per request.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, has_cuda_backend, has_nvidia_gpu, log, run_main  # noqa: E402
from lib.keys import admin_key, read_admin_key, read_keys_file  # noqa: E402
from lib import replicas  # noqa: E402
from lib.ports import port_in_use, read_pid, require_port_free  # noqa: E402,F401
from lib.slots import GPU_SLOTS, cpu_slots  # noqa: E402

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def make_hint(target: str, args) -> str:
    """The make command for target with the variables this server was started with (make stop OUT=out-b)."""
    return " ".join(["make", target, *shlex.split(getattr(args, "make_vars", "") or "")])


def write_pid(pid_file: Path, pid: int, args) -> None:
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    pid_file.write_text(json.dumps({"pid": pid, "host": args.host, "port": args.port, "model": str(
        Path(args.model).resolve()), "model_mtime": Path(args.model).stat().st_mtime,
        "adapters": adapters_key(args), "settings": settings_key(args)}) + "\n")


def settings_key(args) -> list:
    """The settings asked for (not what auto made of them, which follows the free memory): a server started
    with other ones is restarted."""
    return [args.engine, args.gpu_layers, str(args.ctx_size), args.parallel, args.max_tokens, args.backend_sampling,
            args.cache_ram, args.alias, hashlib.sha256((args.api_key or "").encode()).hexdigest()[:16], args.extra_args,
            web_key(args), str(args.keys_file or ""), str(args.usage_log or ""),
            hashlib.sha256((args.admin_key or "").encode()).hexdigest()[:16]]


def web_key(args) -> str | None:
    folder = web_folder(args)
    return str(folder) if folder else None


def adapters_key(args) -> str | None:
    return str(Path(args.adapters).resolve()) if args.adapters else None


def adapter_files(folder: Path) -> list[Path]:
    """The adapters to serve: folder/*.gguf, by name."""
    if not folder.is_dir():
        raise UserError(f"adapter folder {folder} does not exist (run 'make adapters')")
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no adapter files (*.gguf) in {folder} (run 'make adapters')")
    return files


class Refused(UserError):
    """The server answered a call with an HTTP error."""


def api_call(url: str, path: str, body: dict | None, api_key: str | None, timeout: float = 600) -> dict:
    """POST body (GET without one) to the server; its JSON answer, or Refused naming its HTTP error."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            detail = json.loads(text).get("error", {}).get("message", text)
        except (ValueError, AttributeError):
            detail = text
        raise Refused(f"{path}: {e.code} {str(detail).strip()[:200]}") from None
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError) as e:
        raise UserError(f"cannot reach the running server at {url} ({e})") from None


def load_new_adapters(url: str, folder: Path, admin_key_file: Path) -> list[str]:
    """Have the running server load the adapter files it does not serve yet (by name: the server takes them from
    its own adapters folder), with the admin key it was started with; their names."""
    api_key = read_admin_key(admin_key_file)

    def call(path: str, body: dict | None = None) -> dict:
        try:
            return api_call(url, path, body, api_key)
        except Refused as e:
            raise UserError(f"the running server refused {e}") from None

    served = {Path(a["path"]).stem for a in call("/lora-adapters")}
    added = []
    for f in adapter_files(folder):
        if f.stem not in served:
            call("/lora-adapters/load", {"name": f.stem})
            added.append(f.stem)
    return added


def pick_engine(engine: str, llamafile: Path, llama_server: Path) -> tuple[str, Path]:
    usable_llamafile = llamafile.exists() and os.access(llamafile, os.X_OK)
    if engine == "llamafile" or (engine == "auto" and usable_llamafile):
        if not usable_llamafile:
            raise UserError(f"no llamafile binary at {llamafile}: run 'make llamafile' or use ENGINE=llama-server")
        return "llamafile", llamafile
    if not llama_server.exists():
        raise UserError(f"no llama-server at {llama_server}: run 'make vendor' first")
    return "llama-server", llama_server


def server_command(args, engine: str, binary: Path) -> list[str]:
    cmd = [str(binary)]
    if engine == "llamafile":
        cmd += ["--server", "--nobrowser"]
    cmd += ["-m", str(args.model), "--host", args.host, "--port", str(args.port), "--alias", args.alias]
    if args.adapters:  # loaded, but each applied only to the requests that name it (patches/llama.cpp/0009)
        for f in adapter_files(Path(args.adapters)):
            cmd += ["--lora", str(f.resolve())]
        cmd += ["--lora-init-without-apply"]
    gpu_layers = args.gpu_layers
    if gpu_layers == "auto":
        cuda_build = engine == "llamafile" or has_cuda_backend(binary.parent)
        gpu_layers = "999" if cuda_build and has_nvidia_gpu() else "0"
    cmd += ["-ngl", gpu_layers]
    # Flash attention where the backend has it; continuous batching is the engine's default, and its --fit
    # (on by default) sizes an unset context to the free memory.
    if engine == "llama-server":
        cmd += ["-fa", "auto"]
    ctx = "" if args.ctx_size in ("auto", "0", "") else args.ctx_size
    parallel = args.parallel
    if parallel == "auto":
        # lib/slots.py: 32 slots on a GPU (its context fitted by the engine); on a CPU, slots and a context
        # for each from the cores and the memory
        if gpu_layers != "0":
            parallel = str(GPU_SLOTS)
        else:
            slots, per_slot = cpu_slots(Path(args.model))
            parallel, ctx = str(slots), ctx or str(slots * per_slot)
    if ctx:
        cmd += ["-c", ctx]
    if parallel and parallel != "0":
        cmd += ["-np", parallel]
    # a default cap on each request's tokens (a request's own max_tokens / n_predict wins): a model caught in
    # a loop would otherwise hold its slot until the context is full
    cmd += ["-n", str(args.max_tokens if args.max_tokens > 0 else -1)]
    on_gpu_server = engine == "llama-server" and gpu_layers != "0"
    if engine != "llama-server" and (args.backend_sampling == "on" or args.cache_ram not in ("auto", "")):
        raise UserError("--backend-sampling on and --cache-ram are llama-server flags; pass --engine llama-server")
    # Sampling stays on the CPU by default (auto = off): our llama-server samples the busy slots on a pool of
    # threads (patches/llama.cpp/0004), which measured faster on an H100 at 8 and 32 clients than -bs's
    # per-sequence sampler graphs on the GPU, and level at 1 (README, Serving). on: -bs (llama-server falls back
    # to the CPU by itself for requests it cannot serve that way: grammars, n_probs).
    if args.backend_sampling == "on":
        cmd += ["-bs"]
    # Its host-RAM prompt cache copies a finished slot's KV cache out while every other slot waits.
    cache_ram = args.cache_ram
    if cache_ram not in ("auto", "") and not cache_ram.lstrip("-").isdigit():
        raise UserError(f"--cache-ram takes MiB (a whole number, -1 for no limit) or auto, not {cache_ram!r}")
    if cache_ram == "auto":
        cache_ram = "0" if on_gpu_server else ""
    if args.adapters and cache_ram != "0":
        # its cached prompts do not record which adapter computed them: one could be restored for another
        if args.cache_ram not in ("auto", ""):
            raise UserError("--cache-ram cannot be used with --adapters (the prompt cache does not know adapters)")
        cache_ram = "0"
    if cache_ram:
        cmd += ["--cache-ram", cache_ram]
    if args.api_key:
        cmd += ["--api-key", args.api_key]
    if engine == "llama-server" and (page := web_folder(args)):
        cmd += ["--path", str(page)]
    if engine == "llama-server":  # keys per tenant, the admin key, usage (patches/llama.cpp/0015)
        if args.keys_file:
            cmd += ["--keys-file", str(Path(args.keys_file).resolve())]
        if args.admin_key_file:
            cmd += ["--admin-key-file", str(Path(args.admin_key_file).resolve())]
        if args.usage_log:
            cmd += ["--usage-log", str(Path(args.usage_log).resolve())]
        if args.adapters:
            cmd += ["--adapters-dir", str(Path(args.adapters).resolve())]
        cmd += ["--metrics"]  # /metrics: the admin key only
    elif args.keys_file:
        raise UserError("KEYS_FILE needs llama-server (ENGINE=llama-server): llamafile has one flat --api-key")
    return cmd + shlex.split(args.extra_args)


def web_folder(args) -> Path | None:
    """The folder of the chat page llama-server serves at / (its static files, --path), or None for none."""
    if not getattr(args, "web", None):
        return None
    folder = Path(args.web).resolve()
    if not (folder / "index.html").is_file():
        raise UserError(f"no chat page at {folder}/index.html (pass --web '' to serve without one)")
    return folder


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, logpath: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            show_tail(logpath)
            raise UserError(f"the server exited with code {proc.returncode} before it was ready (log: {logpath})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200 and json.loads(r.read() or b"{}").get("status", "ok") == "ok":
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        time.sleep(0.25)
    proc.terminate()
    show_tail(logpath)
    raise UserError(f"the server did not become healthy within {timeout:.0f} s (log: {logpath})")


def check_answers(url: str, api_key: str | None) -> None:
    """/health says ok once the model is loaded, and a server can still fail every request (a vocabulary it
    cannot use, a broken chat template): one real request through the tokenizer and the chat template."""
    try:
        if not api_call(url, "/tokenize", {"content": "Hello"}, api_key, timeout=60).get("tokens"):
            raise Refused("/tokenize: no tokens for 'Hello'")
        api_call(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 1},
                 api_key, timeout=300)
    except UserError as e:
        raise UserError(f"the server started but cannot answer: {e}") from None


def show_tail(logpath: Path, n: int = 15) -> None:
    try:
        lines = logpath.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return
    print("--- last lines of the server log ---\n" + "\n".join(lines) + "\n---", file=sys.stderr)


def print_usage(url: str, api_key: str | None, page: bool, keys_file: Path | None = None) -> None:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    if keys_file and not api_key:  # a tenant's key, as `make key` printed it
        auth = " -H \"Authorization: Bearer $KEY\""
    print(f"""
Server ready at {url}.""" + (f"""
Chat page: {url}/  (a browser opens it with OPEN=1)""" if page else "") + f"""
Try:
  curl -s {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\
       -d '{{"messages":[{{"role":"user","content":"Tell me a fairy tale"}}],"max_tokens":200}}'
  curl -s {url}/completion{auth} -d '{{"prompt":"Once upon a time","n_predict":64}}'
  curl -s {url}/health
""", flush=True)


def start(args) -> None:
    if not Path(args.model).exists():
        raise UserError(f"model file {args.model} does not exist (run 'make quantize')")
    if args.host not in LOOPBACK and not args.api_key and not args.keys_file and not args.allow_no_key:
        raise UserError(f"refusing to bind {args.host} without an API key: set API_KEY=... or KEYS_FILE=... "
                        f"(or ALLOW_NO_KEY=1 to serve without one)")
    if args.keys_file:
        keys = read_keys_file(args.keys_file)  # one clear error before the server would refuse to start
        log(f"keys file {args.keys_file}: {len(keys)} key(s) for {len({k['tenant'] for k in keys})} tenant(s)")
    if args.adapters and args.engine == "llamafile":
        raise UserError("serving adapters by name needs llama-server (ENGINE=llama-server or auto)")
    if replicas.wanted(args, sys.modules[__name__]):  # several engines behind the balancer (lib/replicas.py)
        # the engines read the admin key file when they start: one that a rollout restarts must find the key
        # the others have, so an existing file is kept unless ADMIN_KEY names another
        if args.admin_key_file and (args.admin_key or not Path(args.admin_key_file).exists()):
            admin_key(args.admin_key_file, args.admin_key)
        return replicas.start(args, sys.modules[__name__])
    if args.pid_file and (running := read_pid(args.pid_file)):
        same = ("replicas" not in running
                and running["model"] == str(Path(args.model).resolve()) and running["port"] == args.port
                and running["host"] == args.host and running["model_mtime"] == Path(args.model).stat().st_mtime
                and running.get("adapters") == adapters_key(args) and running.get("settings") == settings_key(args))
        if same and args.adapters:
            host = f"[{args.host}]" if ":" in args.host else args.host
            added = load_new_adapters(f"http://{host}:{args.port}", Path(args.adapters), args.admin_key_file)
            log(f"already serving {args.model} on {args.host}:{args.port} (pid {running['pid']})"
                + (f"; loaded {', '.join(added)}" if added else "; no new adapters"))
            return
        if same and args.background:
            host = f"[{args.host}]" if ":" in args.host else args.host
            page = f"http://{host}:{args.port}/"
            log(f"already serving {args.model} on {args.host}:{args.port} (pid {running['pid']}); chat page: {page}")
            if args.open:
                webbrowser.open(page)
            return
        if not args.background:
            raise UserError(f"a server is already running (pid {running['pid']}, {args.pid_file}); "
                            f"'{make_hint('stop', args)}' first")
        log(f"restarting the server (pid {running['pid']}) to serve {args.model} with these settings")
        stop(args)
    require_port_free(args.host, args.port, None)
    engine, binary = pick_engine("llama-server" if args.adapters else args.engine, args.llamafile, args.llama_server)
    probe_key = args.api_key  # the key of the check that the server answers
    if engine == "llama-server" and args.admin_key_file:
        # ADMIN_KEY or a new one, readable by this user only; it is also an inference key (tenant "admin")
        admin = admin_key(args.admin_key_file, args.admin_key)
        probe_key = args.api_key or admin
    cmd = server_command(args, engine, binary)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting {engine} on {args.host}:{args.port} (log: {args.log})")
    with open(args.log, "ab") as logf:
        logf.write(("$ " + " ".join(shlex.quote(c) for c in cmd) + "\n").encode())
        logf.flush()
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=args.background)
    host = f"[{args.host}]" if ":" in args.host else args.host
    url = f"http://{host}:{args.port}"
    try:
        wait_healthy(proc, url, args.timeout, args.log)
        try:
            check_answers(url, probe_key)
        except UserError:
            show_tail(args.log)
            raise
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)  # its port is free when this returns
        raise
    # llamafile's own page is at / as well (it is started with --nobrowser)
    page = engine == "llamafile" or web_folder(args) is not None
    if args.open and page:
        webbrowser.open(url + "/")
    if args.background:
        if args.pid_file:
            write_pid(args.pid_file, proc.pid, args)
        print_usage(url, args.api_key, page, args.keys_file)
        log(f"running in the background (pid {proc.pid}); stop it with '{make_hint('stop', args)}'")
        return
    print_usage(url, args.api_key, page, args.keys_file)
    log("serving in the foreground; press Ctrl-C to stop")
    if args.pid_file:
        write_pid(args.pid_file, proc.pid, args)
    wait_in_foreground(proc, args.pid_file, grace=15)


def wait_in_foreground(proc: subprocess.Popen, pid_file: Path | None, grace: float) -> None:
    """Until proc ends; SIGTERM or Ctrl-C stop it (grace seconds to exit); its pid file goes with it."""
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=grace)
    finally:
        if pid_file:
            pid_file.unlink(missing_ok=True)


def stop(args) -> None:
    running = read_pid(args.pid_file) if args.pid_file else None
    if running is None:
        if args.pid_file:
            args.pid_file.unlink(missing_ok=True)
        log("no server running")
        return
    pid = int(running["pid"])
    os.kill(pid, signal.SIGTERM)
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except OSError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
    args.pid_file.unlink(missing_ok=True)
    log(f"stopped the server (pid {pid})")


def status(args) -> None:
    running = read_pid(args.pid_file) if args.pid_file else None
    if running is None:
        log("no server running")
    elif running.get("replicas"):
        replicas.status(running)
    else:
        log(f"one server on {running['host']}:{running['port']} (pid {running['pid']}), "
            f"{Path(running['model']).name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--model", type=Path, help="GGUF file to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--background", action="store_true", help="return once healthy, leaving the server running")
    p.add_argument("--pid-file", type=Path, default=None)
    p.add_argument("--log", type=Path, default=ROOT / "out" / "logs" / "server.log")
    p.add_argument("--engine", choices=["auto", "llamafile", "llama-server"], default="auto")
    p.add_argument("--llamafile", type=Path, default=ROOT / "vendor" / "llamafile" / "bin" / "llamafile")
    p.add_argument("--llama-server", type=Path, default=ROOT / "vendor" / "llama.cpp" / "build" / "bin" / "llama-server")
    p.add_argument("--gpu-layers", default="auto", help="layers to offload (auto: all when a GPU is present)")
    p.add_argument("--ctx-size", default="auto",
                   help="context size, all slots together (auto: the engine's on a GPU; on a CPU see --parallel)")
    p.add_argument("--parallel", default="auto",
                   help="parallel slots (auto: 32 when the model is on a GPU; on a CPU from the cores and memory, "
                        "up to 4,096 tokens of context each: scripts/lib/slots.py)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="tokens a request generates at most unless it asks for another number (0: no cap)")
    p.add_argument("--make-vars", default="", help="make variables for the hints printed (e.g. 'OUT=out-b')")
    p.add_argument("--backend-sampling", choices=["auto", "on", "off"], default="auto",
                   help="llama-server samples on the GPU (-bs) (auto = off: it samples the slots on CPU threads)")
    p.add_argument("--cache-ram", default="auto",
                   help="MiB of host RAM for llama-server's prompt cache (auto: 0 when the model is on a GPU, "
                        "else the engine's default)")
    p.add_argument("--alias", default="lora-ship", help="model name reported by the API")
    p.add_argument("--adapters", type=Path, default=None,
                   help="folder of GGUF LoRA adapters to serve beside the base, chosen per request by name")
    p.add_argument("--api-key", default=os.environ.get("API_KEY") or None)
    p.add_argument("--allow-no-key", action="store_true", help="allow a non-loopback host without an API key")
    p.add_argument("--keys-file", type=Path, default=None,
                   help="keys per tenant: sha256 of each key, its tenant, its models (llama-server; scripts/keys.py)")
    p.add_argument("--admin-key", default=os.environ.get("ADMIN_KEY") or None,
                   help="the admin key (default: $ADMIN_KEY, else a new random one each start)")
    p.add_argument("--admin-key-file", type=Path, default=None,
                   help="where the admin key is kept (0600) for this project's own admin calls (default: beside "
                        "--pid-file, NAME.admin.key); with neither, the admin routes answer 403")
    p.add_argument("--usage-log", type=Path, default=None, help="one JSON line per request (llama-server)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for /health")
    p.add_argument("--web", default=str(ROOT / "web"),
                   help="folder of the chat page llama-server serves at / (default: %(default)s; '' for none)")
    p.add_argument("--open", action="store_true", help="open the chat page in a browser once the server is ready")
    p.add_argument("--extra-args", default="", help="more flags for the server, as one string")
    p.add_argument("--replicas", default="1", help="engine processes behind the balancer (auto: one per GPU)")
    p.add_argument("--remote-replicas", default="", help="host:port,... of replicas on other machines")
    p.add_argument("--balancer", default="auto", help="auto (haproxy when there is more than one replica), "
                   "haproxy (also for one), none")
    p.add_argument("--affinity", choices=["on", "off"], default="on",
                   help="one conversation (X-Session-Id or the JSON user field) to one replica")
    p.add_argument("--check-interval-ms", type=int, default=1000, help="the balancer's health check interval")
    args = p.parse_args()
    if args.admin_key_file is None and args.pid_file:  # beside the pid file: out/server.pid -> out/server.admin.key
        args.admin_key_file = args.pid_file.with_name(args.pid_file.stem + ".admin.key")
    if args.action == "start":
        if not args.model:
            raise UserError("start needs --model")
        start(args)
    elif args.action == "status":
        status(args)
    else:
        stop(args)


if __name__ == "__main__":
    run_main(main)
