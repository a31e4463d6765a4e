"""A GGUF file's key-value metadata, read with the standard library only (serve.py runs on the system Python,
where gguf-py is not installed). Only the header is read; arrays (the vocabulary) are skipped, not kept."""
from __future__ import annotations

import struct
from pathlib import Path

from lib.common import UserError

# GGUF value types: struct format of the fixed-size ones; 8 is a string, 9 an array
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


def read_metadata(path: Path) -> dict:
    """{key: value} of the file's metadata; arrays come back as their length (an int)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                raise UserError(f"{path} is not a GGUF file")
            _version, _n_tensors, n_kv = struct.unpack("<IQQ", f.read(20))
            return dict(_read_kv(f) for _ in range(n_kv))
    except (OSError, struct.error) as e:
        raise UserError(f"cannot read the metadata of {path} ({e})") from None


def _read(f, fmt: str):
    return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]


def _read_string(f) -> str:
    return f.read(_read(f, "Q")).decode("utf-8", errors="replace")


def _read_value(f, vtype: int):
    if vtype in SCALARS:
        return _read(f, SCALARS[vtype])
    if vtype == STRING:
        return _read_string(f)
    if vtype == ARRAY:
        item_type, n = _read(f, "I"), _read(f, "Q")
        if item_type in SCALARS:
            f.seek(n * struct.calcsize(SCALARS[item_type]), 1)
        else:
            for _ in range(n):
                _read_value(f, item_type)
        return n
    raise struct.error(f"unknown value type {vtype}")


def _read_kv(f) -> tuple[str, object]:
    key = _read_string(f)
    return key, _read_value(f, _read(f, "I"))


def kv_bytes_per_token(meta: dict) -> int | None:
    """Bytes an f16 KV cache holds per token of context (all layers, K and V), or None if the file does not say."""
    arch = meta.get("general.architecture")
    try:
        layers = int(meta[f"{arch}.block_count"])
        heads = int(meta[f"{arch}.attention.head_count"])
        kv_heads = meta.get(f"{arch}.attention.head_count_kv", heads)
        if not isinstance(kv_heads, int) or kv_heads <= 0:  # an array: one count per layer; take the head count
            kv_heads = heads
        head_dim = int(meta[f"{arch}.embedding_length"]) // heads
        k = int(meta.get(f"{arch}.attention.key_length", head_dim))
        v = int(meta.get(f"{arch}.attention.value_length", head_dim))
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return layers * kv_heads * (k + v) * 2


def context_length(meta: dict) -> int | None:
    value = meta.get(f"{meta.get('general.architecture')}.context_length")
    return int(value) if isinstance(value, int) and value > 0 else None
