"""Lazy reading and streaming writing of safetensors checkpoints, one tensor in memory at a time.

Reading copies each tensor (or a range of its rows) out of the file with plain reads rather than mmap, so
the pages of a 16 GB base never pile up in the process's resident set; writing lays out the header first (all shapes
and dtypes are known before any data is computed) and then appends each tensor's bytes as it is produced,
so a merge never holds the whole model in memory.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

from lib.common import UserError

DTYPE_TO_ST = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}
ST_TO_DTYPE = {v: k for k, v in DTYPE_TO_ST.items()}


class CheckpointReader:
    """All tensors of a (possibly sharded) model folder, read lazily by name: safetensors, or else PyTorch's
    pytorch_model*.bin shards (older Llama 2 and Mistral fine-tunes ship only those)."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.folder = folder
        self._where: dict[str, str] = {}
        self._meta: dict[str, tuple[str, list[int]]] = {}
        self._offset: dict[str, int] = {}  # absolute file offset of each tensor's first byte
        self._pickled: dict[str, torch.Tensor] = {}  # tensors of .bin shards, memory-mapped
        files = weight_files(folder, "model.safetensors", "*.safetensors")
        if not files:
            bins = weight_files(folder, "pytorch_model.bin", "pytorch_model*.bin")
            if not bins:
                raise UserError(f"no model weights in {folder} (no *.safetensors, no pytorch_model*.bin)")
            for name in bins:
                self._read_pickle(name)
            return
        for name in files:
            header = read_header(folder / name)
            data_start = 8 + header_length(folder / name)
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                if info["dtype"] not in ST_TO_DTYPE:
                    raise UserError(f"{folder / name}: tensor {key} has dtype {info['dtype']}, which is not supported")
                self._where[key] = name
                self._meta[key] = (info["dtype"], info["shape"])
                self._offset[key] = data_start + info["data_offsets"][0]

    def _read_pickle(self, name: str) -> None:
        """A pytorch_model*.bin shard, with weights_only (no code in the pickle runs) and memory-mapped, so only
        the rows asked for are read from disk."""
        path = self.folder / name
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the pre-1.6 (not zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged or unsafe pickle
            raise UserError(f"cannot read {path}: {str(e).strip().splitlines()[0] if str(e).strip() else e}") from None
        for key, tensor in state.items():
            if not isinstance(tensor, torch.Tensor) or tensor.dtype not in DTYPE_TO_ST:
                raise UserError(f"{path}: {key} is not a tensor of a supported dtype")
            self._where[key] = name
            self._meta[key] = (DTYPE_TO_ST[tensor.dtype], list(tensor.shape))
            self._pickled[key] = tensor

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> list[int]:
        return self._meta[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return ST_TO_DTYPE[self._meta[key][0]]

    def get(self, key: str) -> torch.Tensor:
        return self.get_rows(key, 0, self.shape(key)[0] if self.shape(key) else 1)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor (along its first dimension), read straight into a new buffer."""
        dtype, shape = ST_TO_DTYPE[self._meta[key][0]], self._meta[key][1]
        if key in self._pickled:
            tensor = self._pickled[key]
            return (tensor[start:stop] if shape else tensor).clone(memory_format=torch.contiguous_format)
        row_bytes = tensor_bytes(dtype, shape[1:])
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        with open(self.folder / self._where[key], "rb") as f:
            f.seek(self._offset[key] + start * row_bytes)
            if f.readinto(buf.numpy()) != buf.numel():
                raise UserError(f"{self.folder / self._where[key]} ends inside tensor {key}: the file is truncated")
        return buf.view(dtype).reshape([stop - start, *shape[1:]] if shape else [])


def weight_files(folder: Path, single: str, pattern: str) -> list[str]:
    """The weight files of one format in a model folder: those its index lists, else `single`, else every
    file matching `pattern`."""
    index = folder / f"{single}.index.json"
    if index.exists():
        try:
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{index} is not a valid weight index ({e})") from None
    if (folder / single).exists():
        return [single]
    return sorted(p.name for p in folder.glob(pattern))


def header_length(path: Path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def read_header(path: Path) -> dict:
    """Parse a safetensors header, turning any corruption into one clear UserError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if n > size - 8 or n > 100 << 20:
                raise ValueError(f"header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError(f"tensor data ends at byte {8 + n + end} but the file has {size}")
        return header
    except (ValueError, KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"corrupt safetensors file {path}: {e}") from None


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a small file (an adapter) whole, after checking its header."""
    read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise UserError(f"corrupt safetensors file {path}: {e}") from None


class ShardedWriter:
    """Writes tensors in a planned order into safetensors shards of at most `max_shard_bytes`.

    `plan` is [(name, dtype, shape)] in write order; `write(name, tensor)` must follow that order.
    """

    def __init__(self, folder: Path, plan: list[tuple[str, torch.dtype, list[int]]],
                 max_shard_bytes: int = 5 << 30, metadata: dict | None = None):
        self.folder = Path(folder)
        self.plan = plan
        shards: list[list[tuple[str, torch.dtype, list[int]]]] = [[]]
        size = 0
        for entry in plan:
            nbytes = tensor_bytes(entry[1], entry[2])
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(entry)
            size += nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [
            f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._metadata = {"format": "pt", **(metadata or {})}
        self._queue: Iterator[tuple[int, str, torch.dtype, list[int]]] = iter(
            [(i, *entry) for i, shard in enumerate(shards) for entry in shard])
        self._current = -1
        self._fh = None
        self.total_bytes = sum(tensor_bytes(d, s) for _, d, s in plan)

    def _open(self, i: int) -> None:
        if self._fh:
            self._fh.close()
        header: dict = {"__metadata__": self._metadata}
        offset = 0
        for name, dtype, shape in self._shards[i]:
            nbytes = tensor_bytes(dtype, shape)
            header[name] = {"dtype": DTYPE_TO_ST[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as safetensors does
        self._fh = open(self.folder / self.files[i], "wb")
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._current = i

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shard, expected, dtype, shape = next(self._queue)
        if name != expected:
            raise RuntimeError(f"writer expected {expected}, got {name}")
        if shard != self._current:
            self._open(shard)
        if tensor.dtype != dtype or list(tensor.shape) != list(shape):
            raise RuntimeError(f"{name}: planned {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}")
        self._fh.write(tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")

    def close(self) -> None:
        if self._fh:
            self._fh.close()
            self._fh = None
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {name: self.files[i] for i, shard in enumerate(self._shards)
                                    for name, _, _ in shard}}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def tensor_bytes(dtype: torch.dtype, shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()
