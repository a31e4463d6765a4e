#!/usr/bin/env python3
"""Merge a LoRA checkpoint into its base and write the GGUF directly: no merged copy on disk in between.

llama.cpp's own converter (convert_hf_to_gguf.py at the pinned commit) does all the GGUF work: tensor names,
the q/k permutation, metadata, tokenizer, which tensors stay F32. Only its tensor *source* is replaced: each
tensor is read from the base and merged with the adapter (lib/merge.py: MergedSource) as the converter writes it
(the next two prefetched), so a few tensors are in memory at a time; embedding and output go in row chunks.
Its single-threaded numpy q8_0 is replaced by a multi-threaded torch one that gives the same bytes.
It does not import Transformers where it can do without (ConfigFromJson, FastTokenizer): that import alone
costs more than merging the default model on two cores.

The merged weights go to the converter in float32 where the output is f32 or quantized (q8_0, and the f16
GGUF that llama-quantize types start from), so they are rounded once, to the output type. For f16 and bf16
output, or with --round-to-base-dtype, they are first rounded to the base's dtype, exactly as the two-step
path (merge_lora.py writing an HF model, then convert_gguf.py) does, and both give the same GGUF tensors.

--quant q8_0 (default), f16, bf16, f32 are written directly; llama-quantize types (Q4_K_M, ...) go
through a 16-bit GGUF that is deleted afterwards. k-quant and IQ types are quantized with an importance matrix
computed on that 16-bit GGUF over the fine-tune's training data (lib/imatrix.py; --imatrix off: none);
Q4_K_M+ and the like are per-tensor plans at that type's size (lib/quant_plan.py); auto, the smallest
candidate within --max-kl on held-out text (lib/quant_auto.py).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import (  # noqa: E402
    ROOT, UserError, add_checkpoint_args, atomic_file, human_bytes, log, require_base, require_free_space, run_main)
from lib.imatrix import Imatrix, add_imatrix_args  # noqa: E402
from lib.quant_auto import Auto, add_auto_args  # noqa: E402
from lib.quants import CONVERTER_TYPES, QUANTIZE_TYPES, quant_key, via_16bit  # noqa: E402

# float32 bytes per row chunk of a streamed tensor (tests set it small to exercise the chunking)
ROW_CHUNK_BYTES = int(os.environ.get("LORA_SHIP_ROW_CHUNK_BYTES", 128 << 20))
Q8_STEP_BLOCKS = 1 << 16  # blocks quantized per step (8 MiB of float32: stays in cache, measured best)
STREAMED = ("embed_tokens.weight", "lm_head.weight")  # big, and passed through unchanged by the converter


_q8_buffers: dict = {}


def q8_0(arr):
    """Q8_0 blocks of a float32 array, byte for byte what gguf-py's (and ggml's reference) quantizer gives:
    per 32 values d = max|x| / 127 (stored as fp16) and q = round-half-away(x / d) as int8.
    On the CPU's threads: the same arithmetic on an H100 gave different bytes for some blocks (and no speed)."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(-1, 32)
    out = torch.empty((x.shape[0], 34), dtype=torch.uint8)
    if "q" not in _q8_buffers:  # reused: fresh pages cost more than the arithmetic
        _q8_buffers.update((k, torch.empty(Q8_STEP_BLOCKS, 32)) for k in ("q", "a", "w"))
    for s in range(0, x.shape[0], Q8_STEP_BLOCKS):
        blocks = x[s:s + Q8_STEP_BLOCKS]
        n = blocks.shape[0]
        d, qs = _q8_0_blocks(blocks, *(_q8_buffers[k][:n] for k in ("q", "a", "w")))
        out[s:s + n, :2] = d.half().view(torch.uint8)
        out[s:s + n, 2:].view(torch.int8).copy_(qs)
    return out.numpy().reshape(*arr.shape[:-1], arr.shape[-1] // 32 * 34)


def _q8_0_blocks(blocks, q, a, w):
    """(d, rounded x / d) of [n, 32] blocks, in place in the scratch tensors q, a, w."""
    import torch

    d = torch.abs(blocks, out=a).amax(dim=1, keepdim=True).div_(127)
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    torch.mul(blocks, inv, out=q)
    torch.abs(q, out=a)
    torch.floor(a, out=w)
    return d, a.sub_(w).mul_(2).floor_().add_(w).copysign_(q)  # numpy's np_roundf: half away from zero


def keep_freed_memory() -> None:
    """Have glibc reuse freed heap memory instead of returning big blocks to the kernel: every tensor here is
    allocated and freed once, and fresh pages (a page fault and zeroing each) cost more than the arithmetic."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap for reuse
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


@contextlib.contextmanager
def stand_in_transformers(**names):
    """While active, `from transformers import X` gives names[X] (and only those names). The converter imports
    transformers for two things: AutoConfig, to read config.json, and AutoTokenizer, to list a BPE vocabulary.
    Importing it costs ~2.5 s on two cores, more than merging the whole default model."""
    if "transformers" in sys.modules:  # already paid for (tests importing this in-process): nothing to save
        yield
        return
    module = types.ModuleType("transformers")
    module.__dict__.update(names)
    sys.modules["transformers"] = module
    try:
        yield
    finally:
        del sys.modules["transformers"]


class ConfigFromJson:
    """Stands in for AutoConfig in the converter. A config.json written by Transformers' save_pretrained (it
    records transformers_version) already holds every model field, so AutoConfig(...).to_dict() would only add
    generic defaults (generation and label settings) that the converter does not read; any other config.json
    still goes through Transformers."""

    @staticmethod
    def from_pretrained(path, **kwargs):
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        if "transformers_version" in config:
            return types.SimpleNamespace(to_dict=lambda: config)
        return importlib.import_module("transformers").AutoConfig.from_pretrained(path, **kwargs)


class FastTokenizer:
    """What the converter's BPE vocabulary pass (get_vocab_base) asks of a Transformers tokenizer: vocab, added
    tokens, encode, decode, answered from tokenizer.json by the tokenizers library that Transformers' fast
    tokenizers wrap. The converter hashes encode() of its test string against the hashes it knows (made with
    Transformers): a tokenizer that behaved differently here would miss, and is then rerun with Transformers."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer
        self.backend = Tokenizer.from_file(str(path))
        self.vocab = self.backend.get_vocab(with_added_tokens=True)
        self.added_tokens_decoder = self.backend.get_added_tokens_decoder()

    def get_added_vocab(self) -> dict[str, int]:
        return {token.content: i for i, token in self.added_tokens_decoder.items()}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=False)


def vocab_without_transformers(original):
    """The converter's get_vocab_base, run on FastTokenizer when the model has a tokenizer.json."""
    def get_vocab_base(self):
        tokenizer_json = Path(self.dir_model) / "tokenizer.json"
        if tokenizer_json.is_file() and "transformers" not in sys.modules:
            auto = types.SimpleNamespace(from_pretrained=lambda *a, **k: FastTokenizer(tokenizer_json))
            with stand_in_transformers(AutoTokenizer=auto):
                try:
                    return original(self)
                except NotImplementedError:  # the hash is unknown: let Transformers' own tokenizer decide
                    log("the tokenizer's pre-tokenizer hash is unknown to the converter; retrying with Transformers")
        return original(self)
    return get_vocab_base


def llama_hf_tokens(folder: Path, model_class) -> int | None:
    """How many tokens the converter writes where it reads a SentencePiece-style BPE from tokenizer.json
    (LlamaHfVocab: a Llama 2-style base without tokenizer.model); None where it takes another path. That path,
    unlike the SentencePiece and GPT-2 ones, writes no [PAD] tokens for embedding rows beyond the tokenizer."""
    import inspect

    fast = folder / "tokenizer.json"
    if (folder / "tokenizer.model").exists() or not fast.exists() or \
            "_set_vocab_llama_hf" not in inspect.getsource(model_class.set_vocab):
        return None
    tokenizer = json.loads(fast.read_text(encoding="utf-8"))
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not model.get("byte_fallback") or \
            (tokenizer.get("decoder") or {}).get("type") != "Sequence":  # LlamaHfVocab's own test
        return None
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(fast)).get_vocab_size(with_added_tokens=True)


def cut_to_vocabulary(n_tokens: int):
    """A modify_tensors that keeps the embedding's and output's first n_tokens rows (as the converter itself
    does for Gemma 3): rows no tokenizer id reaches, and whose logits would otherwise be sampled."""
    def modify_tensors(self, data_torch, name, bid):
        if name.endswith(STREAMED) and data_torch.shape[0] > n_tokens:
            data_torch = data_torch[:n_tokens]
        return super(type(self), self).modify_tensors(data_torch, name, bid)
    return modify_tensors


def load_converter(llama_cpp: Path):
    """Import llama.cpp's converter package (and its own gguf-py) from the vendored tree."""
    if not (llama_cpp / "convert_hf_to_gguf.py").exists():
        raise UserError(f"{llama_cpp}/convert_hf_to_gguf.py not found: run 'make vendor' first")
    if "gguf" in sys.modules and not sys.modules["gguf"].__file__.startswith(str(llama_cpp.resolve())):
        raise UserError("gguf was imported before the vendored one; import merge_gguf first")
    sys.path[:0] = [str(llama_cpp.resolve() / "gguf-py"), str(llama_cpp.resolve())]
    with stand_in_transformers(AutoConfig=ConfigFromJson):
        import conversion
    import gguf
    quiet_same_value_rewrites(gguf)
    return conversion, gguf


def quiet_same_value_rewrites(gguf) -> None:
    """The converter sets some keys twice, warning each time it does: SmolLM2's add_bos_token, from its tokenizer
    files and again for every model with a 49,152-token vocabulary ("granite small models"). A second write of
    the value already there changes nothing; it is skipped without the warning. Other rewrites still warn."""
    original = gguf.GGUFWriter.add_key_value
    if getattr(original, "lora_ship", False):
        return

    def add_key_value(self, key, val, vtype, sub_type=None):
        old = self.kv_data[0].get(key)
        if old is not None and old.type == vtype and isinstance(val, (bool, int, float, str)) and old.value == val:
            return None
        return original(self, key, val, vtype, sub_type)

    add_key_value.lora_ship = True
    gguf.GGUFWriter.add_key_value = add_key_value


def use_fast_q8_0(gguf) -> None:
    """Route the converter's Q8_0 quantization (whole tensors and row chunks) through q8_0()."""
    import numpy as np

    original = gguf.quants.quantize
    if getattr(original, "lora_ship", False):
        return
    q8 = gguf.GGMLQuantizationType.Q8_0

    def quantize(data, qtype):
        if qtype != q8 or data.shape[-1] % 32:
            return original(data, qtype)
        if isinstance(data, gguf.LazyNumpyTensor):
            shape = lambda s: gguf.quant_shape_to_byte_shape(s, q8)  # noqa: E731
            return gguf.LazyNumpyTensor._wrap_fn(q8_0, meta_noop=(np.uint8, shape))(data)
        return q8_0(data)

    quantize.lora_ship = True
    gguf.quants.quantize = quantize


class RowChunks:
    """Stands in for a big 2-D tensor that the converter only renames (or cuts to the vocabulary's rows, as
    Gemma 3's does): it hands the writer row chunks (gguf-py's LazyChunkedTensor), so a 2 GB embedding never
    sits in memory whole. `chunks` are (first row, end row, loader of those rows)."""

    def __init__(self, shape: list[int], chunks: list, gguf):
        import torch

        self.shape, self.dtype, self._gguf, self._chunks = torch.Size(shape), torch.float32, gguf, chunks

    @staticmethod
    def ranges(shape: list[int]) -> list[tuple[int, int]]:
        step = max(1, ROW_CHUNK_BYTES // (4 * shape[1]))
        return [(a, min(shape[0], a + step)) for a in range(0, shape[0], step)]

    def dim(self) -> int:
        return 2

    def __getitem__(self, index):
        """The first rows (x[:n]) stay lazy; any other indexing is not something the converter does here."""
        if not (isinstance(index, slice) and index.start in (None, 0) and index.step in (None, 1)
                and index.stop is not None and index.stop >= 0):
            raise NotImplementedError(f"row chunks of a streamed tensor cannot be indexed with {index!r}")
        stop = min(index.stop, self.shape[0])
        kept = [(a, min(b, stop), load if b <= stop else lambda load=load, n=stop - a: load()[:n])
                for a, b, load in self._chunks if a < stop]
        return RowChunks([stop, self.shape[1]], kept, self._gguf)

    def numpy(self):
        import numpy as np
        return self._gguf.LazyChunkedTensor([load for _, _, load in self._chunks], tuple(self.shape), np.float32)


class Prefetcher:
    """Runs the work items (merged tensors, row chunks) in the order the converter will ask for them, the next
    `depth` ones in a background thread, so reading and merging overlap with quantizing and writing."""

    def __init__(self, tasks: dict, depth: int = 2):
        from concurrent.futures import ThreadPoolExecutor

        self.tasks, self.order, self.depth = tasks, list(tasks), depth
        self.position = {k: i for i, k in enumerate(self.order)}
        self.pending: dict = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="prefetch")

    def __call__(self, task_id):
        future = self.pending.pop(task_id, None) or self.pool.submit(self.tasks[task_id])
        i = self.position[task_id]
        for upcoming in self.order[i + 1:i + 1 + self.depth]:
            if upcoming not in self.pending:
                self.pending[upcoming] = self.pool.submit(self.tasks[upcoming])
        return future.result()


def merged_tensor_index(source, conversion, gguf):
    """A replacement for ModelBase.index_tensors: name -> loader of the merged tensor, in the base's order."""
    streamed = {key for key, _, _ in source.plan if key.endswith(STREAMED) and source.can_split_rows(key)}
    tasks = {}
    for key, _, shape in source.plan:
        if key in streamed:
            for a, b in RowChunks.ranges(shape):
                tasks[(key, a, b)] = lambda key=key, a=a, b=b: source.rows(key, a, b).float().numpy()
        else:
            tasks[key] = lambda key=key: source.tensor(key)
    load = Prefetcher(tasks)

    def index_tensors(model, remote_hf_model_id=None):
        tensors = {}
        for key, dtype, shape in source.plan:
            if key in streamed:
                chunks = [(a, b, lambda c=(key, a, b): load(c)) for a, b in RowChunks.ranges(shape)]
                gen = lambda shape=shape, chunks=chunks: RowChunks(shape, chunks, gguf)  # noqa: E731
            else:
                meta = conversion.LazyTorchTensor.meta_with_dtype_and_shape(dtype, tuple(shape))
                gen = lambda key=key, meta=meta: conversion.LazyTorchTensor(  # noqa: E731
                    meta=meta, args=(key,), func=load)
            if item := model.filter_tensors((key, gen)):
                tensors[item[0]] = item[1]
        return tensors

    return index_tensors


def write_gguf(source, outtype: str, out: Path, llama_cpp: Path, model_name: str) -> None:
    """Run the converter on a folder holding the merged model's config and tokenizer, with tensors from source."""
    import torch

    from lib.merge import write_side_files

    conversion, gguf = load_converter(llama_cpp)
    use_fast_q8_0(gguf)
    keep_freed_memory()
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    with tempfile.TemporaryDirectory(prefix=".merge-stage-", dir=out.parent) as stage:
        stage = Path(stage) / model_name  # the converter derives general.* names from the folder's name
        stage.mkdir()
        write_side_files(source, stage, "streaming-gguf")
        hparams = conversion.ModelBase.load_hparams(stage, False)
        arch = conversion.get_model_architecture(hparams, conversion.ModelType.TEXT)
        try:
            model_class = conversion.get_model_class(arch)
        except NotImplementedError:
            raise UserError(f"llama.cpp's converter does not support the architecture {arch}") from None
        overrides = {  # the converter, with our tensors and vocab
            "model_arch": model_class.model_arch,
            "index_tensors": merged_tensor_index(source, conversion, gguf),
            "get_vocab_base": vocab_without_transformers(model_class.get_vocab_base)}
        n_tokens, rows = llama_hf_tokens(stage, model_class), int(hparams.get("vocab_size") or 0)
        if n_tokens is not None and n_tokens < rows:
            log(f"the embedding has {rows} rows for {n_tokens} tokens in tokenizer.json (no tokenizer.model): "
                f"the GGUF keeps the first {n_tokens}, the rest no token reaches")
            hparams["vocab_size"] = n_tokens
            overrides["modify_tensors"] = cut_to_vocabulary(n_tokens)
        model_class = type(model_class.__name__, (model_class,), overrides)
        with torch.inference_mode():
            model = model_class(stage, ftype, out, model_name=model_name, hparams=hparams)
            try:
                model.write()
            except BaseException as e:
                from tqdm import tqdm
                for bar in list(getattr(tqdm, "_instances", [])):  # wipe the converter's progress bar, so the
                    bar.leave = False                               # error stays the last line printed
                    bar.close()
                if isinstance(e, NotImplementedError):  # e.g. a BPE pre-tokenizer it does not know
                    raise UserError(f"llama.cpp's converter cannot convert this model: {e}") from None
                raise


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, type=Path, help="base model folder (Hugging Face format)")
    add_checkpoint_args(p, Path("quantization/checkpoints"))
    p.add_argument("--quant", default="q8_0", help="q8_0 (default), f16, bf16, f32, or Q4_K_M, Q6_K, ...")
    p.add_argument("--out", required=True, type=Path, help="GGUF file to write")
    p.add_argument("--llama-cpp", type=Path, default=ROOT / "vendor" / "llama.cpp", help="llama.cpp folder")
    p.add_argument("--log", type=Path, default=ROOT / "out" / "logs" / "convert.log", help="llama-quantize log")
    p.add_argument("--round-to-base-dtype", action="store_true", help="round the merged weights to the base's "
                   "dtype before the output type, as the two-step path does (same bytes as it; one rounding more)")
    add_imatrix_args(p)
    add_auto_args(p)
    args = p.parse_args()

    from lib.checkpoints import select_checkpoint
    from lib.merge import MergedSource, gguf_model_name

    key = quant_key(args.quant)
    require_base(args.base)
    quantize = args.llama_cpp / "build" / "bin" / "llama-quantize"
    if key in QUANTIZE_TYPES and not quantize.exists():
        raise UserError(f"{quantize} not found: run 'make vendor' first")
    ckpt = select_checkpoint(args.checkpoints_dir, args.checkpoint, args.fallback)
    imatrix = Imatrix.from_args(args, key, ckpt, args.log)
    auto = Auto(args, args.log) if key == "auto" else None
    # 16-bit output: rounded to the base's dtype first (a bf16 base to f16 keeps today's bytes); else float32
    rounded = args.round_to_base_dtype or key in ("f16", "bf16")
    source = MergedSource(args.base, ckpt, "auto" if rounded else "fp32")
    n_params = sum(math.prod(shape) for _, _, shape in source.plan)
    per_weight = CONVERTER_TYPES.get(key) or QUANTIZE_TYPES[key] + 2
    require_free_space(args.out.parent, int(n_params * per_weight), f"the {key} GGUF")
    log(f"merging {ckpt} into {args.base} straight into a {key} GGUF")
    start = time.perf_counter()
    name = gguf_model_name(args.base, ckpt, source.base_cfg)
    with atomic_file(args.out) as tmp:
        if key in CONVERTER_TYPES:
            write_gguf(source, key, tmp, args.llama_cpp, name)
        else:
            via_16bit(lambda mid: write_gguf(source, "f16", mid, args.llama_cpp, name), key, tmp, quantize, args.log,
                      imatrix, auto)
    log(f"wrote {args.out} ({human_bytes(args.out.stat().st_size)}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_main(main)
