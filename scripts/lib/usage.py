"""The usage log of a shared server (out/logs/usage.jsonl, written by llama-server's --usage-log, patch 0015).

One JSON object a line, written when a completion request's response ends: time, tenant, model, prompt_tokens,
cached_prompt_tokens, completion_tokens, ttft_ms, total_ms, status (the HTTP status; 499 when the client closed
the connection first, e.g. a stream cut off), stream.
"""
from __future__ import annotations

import json
from pathlib import Path

from lib.common import UserError

FIELDS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens")


def read_usage(path: Path) -> list[dict]:
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise UserError(f"no usage log at {path} ({e.strerror}): serve with 'make serve' or 'make serve-adapters' "
                        f"first") from None
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            if i == len(lines):  # the server may be writing it
                break
            raise UserError(f"{path} line {i}: not JSON") from None
    return records


def totals(records: list[dict]) -> dict[tuple[str, str], dict]:
    """(tenant, model) -> requests, errors, aborted, the token sums and the mean times."""
    out: dict[tuple[str, str], dict] = {}
    for r in records:
        t = out.setdefault((r["tenant"], r["model"]), {"requests": 0, "errors": 0, "aborted": 0, **{f: 0 for f in FIELDS},
                                                      "ttft_ms": 0.0, "total_ms": 0.0})
        t["requests"] += 1
        t["aborted"] += r["status"] == 499
        t["errors"] += r["status"] >= 400 and r["status"] != 499
        for f in FIELDS:
            t[f] += r[f]
        t["ttft_ms"] += r["ttft_ms"]
        t["total_ms"] += r["total_ms"]
    for t in out.values():
        t["ttft_ms"] /= t["requests"]
        t["total_ms"] /= t["requests"]
    return out


def table(records: list[dict]) -> str:
    head = ("tenant", "model", "requests", "errors", "aborted", "prompt", "cached", "completion", "ttft ms", "total ms")
    rows = [head]
    for (tenant, model), t in sorted(totals(records).items()):
        rows.append((tenant, model, t["requests"], t["errors"], t["aborted"], t["prompt_tokens"],
                     t["cached_prompt_tokens"], t["completion_tokens"], f"{t['ttft_ms']:.0f}", f"{t['total_ms']:.0f}"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(r, widths))) for r in rows)
