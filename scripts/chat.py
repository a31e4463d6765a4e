#!/usr/bin/env python3
"""Send one prompt to the running server's /v1/chat/completions and stream the answer (stdlib only)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import UserError, run_main  # noqa: E402


def stream_chat(url: str, prompt: str, max_tokens: int, temperature: float, api_key: str | None):
    """Yield the answer's text pieces as the server sends them (server-sent events)."""
    body = json.dumps({"messages": [{"role": "user", "content": prompt}], "stream": True,
                       "max_tokens": max_tokens, "temperature": temperature}).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url.rstrip("/") + "/v1/chat/completions", data=body, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=600)
    except urllib.error.HTTPError as e:
        raise UserError(f"server answered {e.code}: {e.read().decode(errors='replace')[:300]}") from None
    except urllib.error.URLError as e:
        raise UserError(f"no server at {url} ({e.reason}); start one with 'make serve-bg'") from None
    with resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            for choice in json.loads(data).get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    yield piece


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--prompt", default=os.environ.get("PROMPT") or "Tell me a fairy tale")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--api-key", default=os.environ.get("API_KEY") or None)
    args = p.parse_args()
    for piece in stream_chat(args.url, args.prompt, args.max_tokens, args.temperature, args.api_key):
        print(piece, end="", flush=True)
    print()


if __name__ == "__main__":
    run_main(main)
