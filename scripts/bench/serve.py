#!/usr/bin/env python3
"""Benchmark the running server against the engine it runs, on the same model, in one run.

served: 1, 8 and 32 concurrent clients (--clients) each send --requests requests to /completion, a distinct
        prompt of exactly --prompt-tokens tokens (ids from the server's /tokenize) and exactly --max-tokens
        generated tokens each (ignore_eos), first without streaming, then streaming. Printed: aggregate
        generated tokens/s (all tokens / wall time), mean per-client tokens/s, time to first token p50/p95
        (streaming), failed requests, and the CPU the clients themselves used (in cores; well under one
        means the Python clients did not set the pace).
        Before them, one uncounted request per client at the highest level warms the server up.
engine: llama.cpp's llama-batched-bench on the same GGUF with the server's GPU layers, flash-attention
        setting and batch sizes (-b/-ub, where set), the same prompt/generation lengths and parallel
        sequences: its generation tokens/s (S_TG, the decoding steps alone) and its end-to-end rate
        (generated tokens / time for prompts + generation, the same work the served figure times).
        The served/engine ratio is taken against the end-to-end rate.
The benchmark starts its own server with serve.py's defaults (plus --serve-args) on a loopback port, and
stops it before the engine runs (the server sizes its KV cache to the free GPU memory).

replicas (--replicas N, N > 1; `auto`: one per GPU): one-shot and streaming levels (default 8, 32, 128 clients)
        on three set-ups, all running at once on ports --port, +1, +2 and measured in turn at each level
        (--rounds times; the median round): the engine alone (one server, no balancer), HAProxy in front of one
        replica (its own cost: a share of the engine alone), HAProxy in front of N replicas (the scaling: a
        multiple of the engine alone). No llama-batched-bench there.

tenants (--tenants): what keys per tenant cost: two servers at once, measured in turn at each level (--rounds;
        the median round): one API key, against a keys file (the same key, scoped by names and a glob) and a
        usage log (one JSON line a request); /metrics counts on both. With --adapters both serve them and client c
        asks adapter c mod N. Printed as the tenants' share of the one-key rate.
adapters (--adapters DIR --merged GGUF, --model being the base): one-shot levels on three servers in turn: the
        merged model of the first adapter; the base with every adapter in DIR, all clients asking the first
        one; the same server with client c asking adapter c mod N (N adapters in each batch). Each is printed
        as a share of the merged model's rate, and the engine runs on the merged GGUF.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import ROOT, UserError, log, run_main  # noqa: E402
from lib import replicas as lib_replicas  # noqa: E402

DEFAULT_CLIENTS = "1,8,32"
WORDS = ("once upon a time there lived a king who had three daughters and the youngest was so beautiful that "
         "the sun itself was astonished whenever it shone in her face").split()


def prompt_text(i: int, n_tokens: int) -> str:
    """Text of a distinct prompt per request, ~1 token per word."""
    words = [WORDS[(i * 7 + k) % len(WORDS)] for k in range(max(n_tokens - 4, 1))]
    return f"Story {i}: " + " ".join(words)


def post(url: str, body: dict, api_key: str | None, timeout: float):
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    return urllib.request.urlopen(req, timeout=timeout)


def prompt_ids(url: str, i: int, args) -> list[int]:
    """Request i's prompt as exactly --prompt-tokens token ids of the served model (BOS included), so that the
    server gets the engine's prompt length: text alone came out 4-10 tokens longer, depending on the tokenizer,
    which also pushed a request's last positions past the engine's 256 KV cells."""
    try:
        with post(url + "/tokenize", {"content": prompt_text(i, args.prompt_tokens + 16), "add_special": True},
                  args.api_key, args.timeout) as r:
            ids = json.loads(r.read())["tokens"]
    except (urllib.error.URLError, OSError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"could not tokenize a prompt on the server: {getattr(e, 'reason', e)}") from None
    if len(ids) < args.prompt_tokens:
        raise UserError(f"the server's tokenizer gave {len(ids)} tokens for a {args.prompt_tokens}-token prompt")
    return ids[:args.prompt_tokens]


def one_request(url: str, prompt: list[int], args, stream: bool, model: str | None = None) -> dict:
    """{tokens, seconds, ttft} of one /completion request (to `model`, an adapter's name), or {error}."""
    body = {"prompt": prompt, "n_predict": args.max_tokens, "ignore_eos": True, "stream": stream,
            "cache_prompt": False, **({"model": model} if model else {})}
    start = time.perf_counter()
    try:
        with post(url + "/completion", body, args.api_key, args.timeout) as r:
            if not stream:
                out = json.loads(r.read())
                return {"tokens": out.get("tokens_predicted", 0), "seconds": time.perf_counter() - start,
                        "ttft": None}
            ttft, tokens = None, 0
            for line in r:
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("content") and ttft is None:
                    ttft = time.perf_counter() - start
                if chunk.get("stop"):
                    tokens = chunk.get("tokens_predicted", tokens)
                    break
            return {"tokens": tokens, "seconds": time.perf_counter() - start, "ttft": ttft}
    except (urllib.error.URLError, OSError, TimeoutError, json.JSONDecodeError, ValueError) as e:
        return {"error": str(getattr(e, "reason", e))}


def drive(url: str, clients: int, args, stream: bool, requests: int | None = None, first_id: int = 0,
          models: list[str] | None = None) -> dict:
    """clients threads, each sending requests (default --requests) requests one after the other (client c to
    models[c % len(models)] when given)."""
    results: list[dict] = []
    lock = threading.Lock()
    n = requests or args.requests
    # distinct prompts (no prompt-cache hits between requests), tokenized before the clock starts
    prompts = {(c, k): prompt_ids(url, first_id + c * 1000 + k + (100000 if stream else 0), args)
               for c in range(clients) for k in range(n)}

    def client(c: int) -> None:
        for k in range(n):
            r = one_request(url, prompts[c, k], args, stream, models[c % len(models)] if models else None)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    client_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
    good = [r for r in results if "error" not in r and r["tokens"] == args.max_tokens]
    ttfts = sorted(r["ttft"] for r in good if r["ttft"] is not None)
    return {"clients": clients, "stream": stream, "requests": len(results), "failed": len(results) - len(good),
            "aggregate": sum(r["tokens"] for r in good) / wall,
            "per_client": statistics.mean(r["tokens"] / r["seconds"] for r in good) if good else 0.0,
            "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95), "client_cpu": client_cpu / wall,
            "errors": sorted({r["error"] for r in results if "error" in r})[:3]}


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def server_flags(log_path: Path) -> list[str]:
    """The command line serve.py started the server with (first line of its log run)."""
    lines = [l for l in log_path.read_text(errors="replace").splitlines() if l.startswith("$ ")]
    return shlex.split(lines[-1][2:]) if lines else []


def flag(cmd: list[str], names: tuple[str, ...], default: str) -> str:
    for i, c in enumerate(cmd[:-1]):
        if c in names:
            return cmd[i + 1]
    return default


def engine_command(bench: Path, model: str, cmd: list[str], clients: list[int], args) -> list[str]:
    """llama-batched-bench on the served model with the server's GPU layers, flash attention and batch sizes."""
    ngl = flag(cmd, ("-ngl", "--gpu-layers", "--n-gpu-layers"), "0")
    fa = flag(cmd, ("-fa", "--flash-attn"), "auto")
    ctx = max(clients) * (args.prompt_tokens + args.max_tokens) + 256
    run = [str(bench), "-m", model, "-c", str(ctx), "-ngl", ngl, "-fa", fa, "-npp", str(args.prompt_tokens),
           "-ntg", str(args.max_tokens), "-npl", ",".join(map(str, clients))]
    for names in (("-b", "--batch-size"), ("-ub", "--ubatch-size")):  # where the server was given them
        if value := flag(cmd, names, ""):
            run += [names[0], value]
    return run


def engine_numbers(bench: Path, model: str, cmd: list[str], clients: list[int], args) -> dict[int, dict]:
    """{s_tg, end_to_end} generated tokens/s per parallel-sequence count from llama-batched-bench."""
    if not bench.exists():
        log(f"no {bench}: skipping the engine comparison (run 'make vendor')")
        return {}
    run = engine_command(bench, model, cmd, clients, args)
    out = subprocess.run(run, capture_output=True, text=True)
    if out.returncode != 0:
        raise UserError(f"llama-batched-bench failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    numbers = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0]) and re.fullmatch(r"\d+", cells[2]):
            pl, tg, total_s = int(cells[2]), int(cells[1]), float(cells[8])  # PP TG B N_KV T_PP S_PP T_TG S_TG T S
            numbers[pl] = {"s_tg": float(cells[7]), "end_to_end": pl * tg / total_s}
    return numbers


def start_server(args, work: Path, model: Path | None = None, adapters: Path | None = None) -> tuple[str, list[str]]:
    """Start serve.py in the background on the bench port; its URL and the engine command line it ran."""
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), "start", "--background", "--model",
           str(model or args.model), "--port", str(args.port), "--pid-file", str(work / "server.pid"), "--log",
           str(work / "server.log"), *(["--adapters", str(adapters)] if adapters else []),
           *shlex.split(args.serve_args)]
    (work / "server.log").unlink(missing_ok=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"the server did not start: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    engine_log = work / "server.log"
    if not engine_log.exists():  # replicas: each engine has its own log, server-r0.log, ...
        engine_log = work / "server-r0.log"
    return f"http://127.0.0.1:{args.port}", server_flags(engine_log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="GGUF file to serve")
    p.add_argument("--serve-args", default="", help="more serve.py flags, as one string (e.g. '--parallel 8')")
    p.add_argument("--port", type=int, default=8089, help="port of the benchmark's own server (loopback)")
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-serve")
    p.add_argument("--llama-bin", type=Path, default=ROOT / "vendor" / "llama.cpp" / "build" / "bin")
    p.add_argument("--clients", default=DEFAULT_CLIENTS, help="concurrency levels (default %(default)s)")
    p.add_argument("--requests", type=int, default=4, help="requests per client and level")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    p.add_argument("--no-engine", action="store_true", help="skip llama-batched-bench")
    p.add_argument("--adapters", type=Path, default=None,
                   help="folder of GGUF adapters: --model is then their base, served with them (see above)")
    p.add_argument("--merged", type=Path, default=None, help="with --adapters: the merged GGUF of the first adapter")
    p.add_argument("--replicas", default="1", help="N > 1 (or auto on a multi-GPU machine): the scaling through "
                   "the balancer (see above)")
    p.add_argument("--rounds", type=int, default=1, help="with --replicas: each level this many times on each "
                   "set-up in turn; each cell the median round")
    p.add_argument("--tenants", action="store_true", help="keys per tenant and the usage log against one API key "
                   "(with --adapters: both serve them, client c asking adapter c mod N)")
    p.add_argument("--first", default=None, help="with --adapters: the adapter --merged holds (default: the first by name)")
    args = p.parse_args()
    args.api_key = os.environ.get("API_KEY") or None  # serve.py gives the server the same key
    if not args.model.exists():
        raise UserError(f"model file {args.model} does not exist (run 'make quantize')")
    replicas = lib_replicas.count(args.replicas, lib_replicas.gpu_ids() if args.replicas == "auto" else [])
    if replicas > 1 and args.clients == DEFAULT_CLIENTS:
        args.clients = "8,32,128"
    clients = [int(c) for c in args.clients.split(",") if c]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    if replicas > 1:
        return bench_replicas(args, clients, work, replicas)
    if args.tenants:
        return bench_tenants(args, clients, work)
    if args.adapters:
        return bench_adapters(args, clients, work)
    levels, cmd = served_levels(args, clients, work, args.model, None,
                                {"one-shot": (None, False), "streaming": (None, True)})
    served = list(levels.values())
    # the engine runs after the server has stopped: the server sizes its KV cache to the free memory
    engine = {} if args.no_engine else engine_numbers(args.llama_bin / "llama-batched-bench", str(args.model),
                                                      cmd, clients, args)
    print(f"\n{args.model.name}: {args.prompt_tokens}-token prompts, {args.max_tokens} generated tokens each, "
          f"{args.requests} request(s) per client; server flags: {' '.join(cmd[3:])}\n")
    print("| clients | mode | served tok/s (all clients) | per client tok/s | TTFT p50 / p95 s | failed | "
          "client CPU (cores) | engine S_TG tok/s | engine end-to-end tok/s | served / engine end-to-end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in served:
        e = engine.get(r["clients"])
        ttft = (f"{r['ttft_p50']:.3f} / {r['ttft_p95']:.3f}" if r["ttft_p50"] is not None else "-")
        vs = (f"{e['s_tg']:.1f} | {e['end_to_end']:.1f} | {r['aggregate'] / e['end_to_end']:.0%}" if e
              else "- | - | -")
        print(f"| {r['clients']} | {'stream' if r['stream'] else 'one-shot'} | {r['aggregate']:.1f} | "
              f"{r['per_client']:.1f} | {ttft} | {r['failed']}/{r['requests']} | {r['client_cpu']:.2f} | {vs} |")
    for r in served:
        if r["errors"]:
            print(f"errors with {r['clients']} clients: {'; '.join(r['errors'])}")
    (work / "results.json").write_text(json.dumps({"served": served, "engine": engine, "server": cmd}, indent=2)
                                       + "\n")
    if any(r["failed"] for r in served):
        raise UserError(f"{sum(r['failed'] for r in served)} request(s) failed")


def served_levels(args, clients: list[int], work: Path, model: Path, adapters: Path | None,
                  modes: dict[str, tuple[list[str] | None, bool]]) -> tuple[dict, list[str]]:
    """The levels on one server for each mode: name -> (the adapter names clients ask, None for no name;
    streaming or one-shot). {(mode, clients): drive()'s numbers}, and the server's command line."""
    url, cmd = start_server(args, work, model, adapters)
    log(f"server: {' '.join(cmd[1:])}")
    out, warmed = {}, set()
    try:
        for mode, (models, stream) in modes.items():
            # Not counted: the first steps of a fresh server (or of other adapters) load GPU kernels and capture
            # graphs for each new batch shape, which would otherwise land in whichever level runs first.
            if tuple(models or ()) not in warmed:
                warmed.add(tuple(models or ()))
                drive(url, max(clients), args, stream=False, requests=1, first_id=500000, models=models)
            for n in clients:
                out[mode, n] = r = drive(url, n, args, stream=stream, models=models)
                log(f"{mode}: {n:>3} clients: {r['aggregate']:.1f} tokens/s, {r['failed']} failed")
    finally:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "stop", "--pid-file",
                        str(work / "server.pid")], capture_output=True)
    return out, cmd


def interleaved(args, clients: list[int], work: Path, setups: dict[str, str], modes: dict[str, bool],
                adapters: Path | None = None, models: list[str] | None = None, same_slots: bool = False) -> dict:
    """Each setup (name -> more serve.py flags) started at once (idle engines cost nothing) on ports --port, +1,
    ...; each level measured on every setup in turn, --rounds times, so that the noise of a busy machine falls on
    all alike. {(setup, mode, clients): [drive()'s numbers per round]}. same_slots: the later setups get the
    first one's slots and context (serve.py sizes them to the memory left, which the first one has taken)."""
    urls, rounds, pinned = {}, {}, ""
    try:
        for i, (name, extra) in enumerate(setups.items()):
            (work / name).mkdir(parents=True, exist_ok=True)
            one = argparse.Namespace(**{**vars(args), "port": args.port + i,
                                        "serve_args": f"{args.serve_args} {pinned} {extra}"})
            urls[name], cmd = start_server(one, work / name, adapters=adapters)
            if same_slots and not pinned:
                pinned = f"--parallel {flag(cmd, ('-np',), 'auto')} --ctx-size {flag(cmd, ('-c',), 'auto')}"
            log(f"{name} on {urls[name]}: serve.py {one.serve_args.strip()}; engine: {' '.join(cmd[1:])}")
        for name, url in urls.items():  # not counted: a fresh server's first steps
            drive(url, max(clients), args, stream=False, requests=1, first_id=500000, models=models)
        for mode, stream in modes.items():
            for c in clients:
                for k in range(args.rounds):
                    for name, url in urls.items():
                        r = drive(url, c, args, stream=stream, models=models)
                        rounds.setdefault((name, mode, c), []).append(r)
                        log(f"{mode}, {c:>3} clients, round {k + 1}, {name}: {r['aggregate']:.1f} tokens/s, "
                            f"{r['failed']} failed")
    finally:
        for name in setups:
            subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "stop", "--pid-file",
                            str(work / name / "server.pid")], capture_output=True)
    return rounds


def median_rounds(rounds: dict) -> dict:
    return {key: sorted(rs, key=lambda r: r["aggregate"])[len(rs) // 2] for key, rs in rounds.items()}


def bench_replicas(args, clients: list[int], work: Path, n: int) -> None:
    """The engine alone, HAProxy with one replica, HAProxy with n replicas (see the docstring), interleaved."""
    setups = {"alone": "--replicas 1 --balancer none", "haproxy-1": "--replicas 1 --balancer haproxy",
              f"haproxy-{n}": f"--replicas {n} --balancer haproxy"}
    modes = {"one-shot": False, "streaming": True}
    rounds = interleaved(args, clients, work, setups, modes)
    served = median_rounds(rounds)
    print(f"\n{args.model.name}: {args.prompt_tokens}-token prompts, {args.max_tokens} generated tokens each, "
          f"{args.requests} request(s) per client, median of {args.rounds} round(s); serve.py flags: "
          f"{args.serve_args.strip() or '(defaults)'}\n")
    print(f"| clients | mode | engine alone tok/s | HAProxy + 1 replica tok/s (share of alone) | HAProxy + {n} "
          f"replicas tok/s (x alone) | TTFT p50 alone / 1 / {n} s | failed |")
    print("|---|---|---|---|---|---|---|")
    for mode in modes:
        for c in clients:
            alone, one, many = (served[name, mode, c] for name in setups)
            ttft = " / ".join(f"{r['ttft_p50']:.3f}" if r["ttft_p50"] is not None else "-" for r in (alone, one, many))
            print(f"| {c} | {mode} | {alone['aggregate']:.1f} | {one['aggregate']:.1f} "
                  f"({one['aggregate'] / alone['aggregate']:.0%}) | {many['aggregate']:.1f} "
                  f"({many['aggregate'] / alone['aggregate']:.2f}x) | {ttft} | "
                  f"{sum(r['failed'] for name in setups for r in rounds[name, mode, c])} |")
    (work / "results-replicas.json").write_text(json.dumps(
        {"replicas": n, "rounds": {f"{s}@{m}@{c}": rs for (s, m, c), rs in rounds.items()}}, indent=2) + "\n")
    failed = sum(r["failed"] for rs in rounds.values() for r in rs)
    if failed:
        raise UserError(f"{failed} request(s) failed")


def bench_tenants(args, clients: list[int], work: Path) -> None:
    """What keys per tenant, the usage log and the per-tenant metrics cost (see the docstring): one plain API key
    against a keys file (the same key, scoped to the models by name and a glob) and a usage log, interleaved."""
    from lib.keys import hash_key
    args.api_key = args.api_key or f"bench-{os.getpid()}-{time.time_ns()}"
    names = sorted(f.stem for f in args.adapters.glob("*.gguf")) if args.adapters else []
    if args.adapters and not names:
        raise UserError(f"no adapter files (*.gguf) in {args.adapters} (run 'make adapters')")
    keys_file, usage = work / "keys.txt", work / "usage.jsonl"
    # scoped as a customer's key is: by name and by a glob that matches nothing here (every pattern is tried)
    alias = flag(shlex.split(args.serve_args), ("--alias",), "lora-ship")  # the base's name (serve.py's default)
    patterns = ",".join([*names, alias, "not-this-one-*"])
    keys_file.write_text(f"{hash_key('someone-else')} tenant=other models=other-*\n"
                         f"{hash_key(args.api_key)} tenant=bench models={patterns}\n")
    keys_file.chmod(0o600)
    usage.unlink(missing_ok=True)
    setups = {"one-key": f"--api-key {args.api_key}",  # (folder names under --workdir)
              "tenants": f"--keys-file {shlex.quote(str(keys_file))} --usage-log {shlex.quote(str(usage))}"}
    modes = {"one-shot": False, "streaming": True}
    rounds = interleaved(args, clients, work, setups, modes, adapters=args.adapters, models=names or None,
                         same_slots=True)
    served = median_rounds(rounds)
    logged = sum(1 for _ in usage.open()) if usage.exists() else 0
    print(f"\n{args.model.name}{f' + {len(names)} adapters (client c asks adapter c mod {len(names)})' if names else ''}:"
          f" {args.prompt_tokens}-token prompts, {args.max_tokens} generated tokens each, {args.requests} request(s) "
          f"per client, median of {args.rounds} round(s); serve.py flags: {args.serve_args.strip() or '(defaults)'}\n")
    print("| clients | mode | one API key tok/s | keys file + usage log tok/s (share) | TTFT p50 one key / tenants s "
          "| failed |")
    print("|---|---|---|---|---|---|")
    for mode in modes:
        for c in clients:
            off, on = (served[name, mode, c] for name in setups)
            ttft = " / ".join(f"{r['ttft_p50']:.3f}" if r["ttft_p50"] is not None else "-" for r in (off, on))
            print(f"| {c} | {mode} | {off['aggregate']:.1f} | {on['aggregate']:.1f} "
                  f"({on['aggregate'] / off['aggregate']:.1%}) | {ttft} | "
                  f"{sum(r['failed'] for name in setups for r in rounds[name, mode, c])} |")
    print(f"\nusage log: {logged} line(s) for the tenants' server")
    (work / "results-tenants.json").write_text(json.dumps(
        {"rounds": {f"{s}@{m}@{c}": rs for (s, m, c), rs in rounds.items()}}, indent=2) + "\n")
    failed = sum(r["failed"] for rs in rounds.values() for r in rs)
    if failed:
        raise UserError(f"{failed} request(s) failed")


def bench_adapters(args, clients: list[int], work: Path) -> None:
    """The merged model against the same adapter served unmerged, alone and among others (see the docstring)."""
    if not args.merged or not args.merged.exists():
        raise UserError("--adapters needs --merged: the merged GGUF of the first adapter (make quantize)")
    names = sorted(f.stem for f in args.adapters.glob("*.gguf"))
    if not names:
        raise UserError(f"no adapter files (*.gguf) in {args.adapters} (run 'make adapters')")
    if args.first:
        if args.first not in names:
            raise UserError(f"--first {args.first}: no {args.first}.gguf in {args.adapters}")
        names.remove(args.first)
        names.insert(0, args.first)
    mixed = f"{len(names)} adapters"
    served, _ = served_levels(args, clients, work, args.merged, None, {"merged": (None, False)})
    more, cmd = served_levels(args, clients, work, args.model, args.adapters,
                              {"one adapter": (names[:1], False), **({mixed: (names, False)} if len(names) > 1 else {})})
    served.update(more)
    engine = {} if args.no_engine else engine_numbers(args.llama_bin / "llama-batched-bench", str(args.merged),
                                                      cmd, clients, args)
    modes = ["merged", "one adapter"] + ([mixed] if len(names) > 1 else [])
    print(f"\n{args.model.name} + {len(names)} adapter(s) ({names[0]} first) against {args.merged.name}: "
          f"{args.prompt_tokens}-token prompts, {args.max_tokens} generated tokens each, {args.requests} one-shot "
          f"request(s) per client; server flags: {' '.join(cmd[3:])}\n")
    print("| clients | " + " | ".join(f"{m} tok/s" for m in modes) + " | failed | engine end-to-end tok/s (merged) |")
    print("|---|" + "---|" * (len(modes) + 2))
    for n in clients:
        base = served["merged", n]["aggregate"]
        cells = [f"{served[m, n]['aggregate']:.1f}" + (f" ({served[m, n]['aggregate'] / base:.0%})" if m != "merged"
                                                         else "") for m in modes]
        failed = sum(served[m, n]["failed"] for m in modes)
        e = engine.get(n)
        print(f"| {n} | " + " | ".join(cells) + f" | {failed} | " + (f"{e['end_to_end']:.1f}" if e else "-") + " |")
    (work / "results-adapters.json").write_text(json.dumps(
        {"served": {f"{m}@{n}": r for (m, n), r in served.items()}, "engine": engine, "server": cmd}, indent=2) + "\n")
    if any(r["failed"] for r in served.values()):
        raise UserError(f"{sum(r['failed'] for r in served.values())} request(s) failed")


if __name__ == "__main__":
    run_main(main)
