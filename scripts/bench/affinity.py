#!/usr/bin/env python3
"""Time to first token of multi-turn conversations through the balancer, with and without affinity.

Starts its own replicas (serve.py --replicas N, default 2) behind HAProxy on a loopback port twice: with
affinity (the default: a conversation's requests, named by X-Session-Id, go to one replica, whose prompt cache
holds the conversation so far) and without (least outstanding requests for every request). Each time,
--conversations conversations run side by side, --turns turns each (streamed /v1/chat/completions): a long system
prompt (~--system-tokens tokens), the history, a new user message, --max-tokens answered. Printed per turn:
median TTFT and the prompt tokens the engine had cached (usage.prompt_tokens_details.cached_tokens), then the
median over turns 2..N.
  bench/affinity.py --model out/model.q8_0.gguf [--replicas 2] [--serve-args '...']
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # scripts/, for lib
from lib.common import ROOT, UserError, log, run_main  # noqa: E402

TALE = ("Once upon a time there lived a king who had three daughters, and the youngest was so beautiful that the "
        "sun itself was astonished whenever it shone in her face. Near the castle lay a great dark forest, and in "
        "the forest under an old lime tree was a well. ")


def turn(url: str, session: str, messages: list[dict], max_tokens: int, timeout: float) -> dict:
    body = {"messages": messages, "max_tokens": max_tokens, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "X-Session-Id": session})
    start, ttft, text, cached, prompt = time.perf_counter(), None, [], None, None
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if piece := choice.get("delta", {}).get("content"):
                    ttft = ttft or time.perf_counter() - start
                    text.append(piece)
            if usage := chunk.get("usage"):
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                prompt = usage.get("prompt_tokens")
    return {"ttft": ttft, "answer": "".join(text), "cached": cached, "prompt": prompt}


def conversation(url: str, c: int, args, out: list) -> None:
    messages = [{"role": "system", "content": f"Conversation {c}. You tell tales. " + TALE * args.system_repeat}]
    for t in range(args.turns):
        messages.append({"role": "user", "content": f"Turn {t + 1}: go on with the tale of the {c}th princess."})
        r = turn(url, f"conversation-{c}", messages, args.max_tokens, args.timeout)
        messages.append({"role": "assistant", "content": r["answer"]})
        out.append({"conversation": c, "turn": t + 1, **{k: r[k] for k in ("ttft", "cached", "prompt")}})


def run(args, affinity: str) -> list[dict]:
    work = args.workdir
    pid = work / "server.pid"
    cmd = [sys.executable, str(ROOT / "scripts" / "serve.py"), "start", "--background", "--model", str(args.model),
           "--port", str(args.port), "--pid-file", str(pid), "--log", str(work / "server.log"), "--replicas",
           str(args.replicas), "--affinity", affinity, *shlex.split(args.serve_args)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise UserError(f"the replicas did not start: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    out: list[dict] = []
    try:
        url = f"http://127.0.0.1:{args.port}"
        threads = [threading.Thread(target=conversation, args=(url, c, args, out)) for c in range(args.conversations)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "stop", "--pid-file", str(pid)],
                       capture_output=True)
    if len(out) != args.conversations * args.turns:
        raise UserError(f"{args.conversations * args.turns - len(out)} turn(s) failed")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--replicas", default="2")
    p.add_argument("--serve-args", default="", help="more serve.py flags, as one string")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench-affinity")
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-repeat", type=int, default=12, help="copies of a ~50-token tale in the system prompt")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    if not args.model.exists():
        raise UserError(f"model file {args.model} does not exist (run 'make quantize')")
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = {}
    for affinity in ("on", "off"):
        log(f"affinity {affinity}: {args.conversations} conversations x {args.turns} turns on {args.replicas} replicas")
        results[affinity] = run(args, affinity)
    print(f"\n{args.model.name}, {args.replicas} replicas, {args.conversations} conversations side by side, "
          f"{args.turns} turns, {args.max_tokens} tokens answered a turn\n")
    print("| turn | prompt tokens | TTFT with affinity s | cached | TTFT without s | cached |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for t in range(1, args.turns + 1):
        row = {a: [r for r in results[a] if r["turn"] == t] for a in results}
        cells = [f"{statistics.median(r['ttft'] for r in row[a]):.3f} | "
                 f"{statistics.mean(r['cached'] / r['prompt'] for r in row[a]):.0%}" for a in ("on", "off")]
        print(f"| {t} | {statistics.median(r['prompt'] for r in row['on']):.0f} | {cells[0]} | {cells[1]} |")
    for a in results:
        later = [r for r in results[a] if r["turn"] > 1]
        summary[a] = {"ttft_p50": statistics.median(r["ttft"] for r in later),
                      "ttft_mean": statistics.mean(r["ttft"] for r in later),
                      "cached": sum(r["cached"] for r in later) / sum(r["prompt"] for r in later)}
    print(f"| 2-{args.turns} | | {summary['on']['ttft_p50']:.3f} (mean {summary['on']['ttft_mean']:.3f}) | "
          f"{summary['on']['cached']:.0%} | {summary['off']['ttft_p50']:.3f} (mean {summary['off']['ttft_mean']:.3f})"
          f" | {summary['off']['cached']:.0%} |")
    (args.workdir / "results.json").write_text(json.dumps({"turns": results, "summary": summary}, indent=1) + "\n")


if __name__ == "__main__":
    run_main(main)
