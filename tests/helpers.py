"""Test helpers: tiny real-tokenizer Llama models, random LoRA adapters, a server on a free port."""
from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
LLAMA_CPP = ROOT / "vendor" / "llama.cpp"
LLAMA_SERVER = LLAMA_CPP / "build" / "bin" / "llama-server"
VOCABS = LLAMA_CPP / "models"


class WarmInterpreter:
    """tests/warm_interpreter.py, started on first use: runs each script in a process forked from a Python that
    has already imported torch (see there). One script at a time; the interpreter ends with this process."""

    def __init__(self, *flags: str):
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("warm_interpreter.py")), *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, cwd=ROOT)
        self.lock = threading.Lock()

    def answer(self, timeout: float | None = None) -> dict | None:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"tests/warm_interpreter.py exited ({self.proc.wait()})")
        return json.loads(line)

    def run(self, cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory(prefix="script-") as tmp:
            out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
            request = {"script": cmd[1], "args": cmd[2:], "env": env, "cwd": str(ROOT), "stdout": str(out),
                       "stderr": str(err)}
            self.proc.stdin.write(json.dumps(request).encode() + b"\n")
            pid = self.answer()["pid"]
            done = self.answer(timeout)
            if done is None:
                os.kill(pid, signal.SIGKILL)
                self.answer()
            # a file is absent when the child failed before opening it
            output = [path.read_text() if path.exists() else "" for path in (out, err)]
            if done is None:
                raise subprocess.TimeoutExpired(cmd, timeout, *output)
            return subprocess.CompletedProcess(cmd, done["returncode"], *output)


_warm: dict[tuple, WarmInterpreter] = {}
WITH_TRANSFORMERS = {"train_lora.py", "eval_quality.py"}  # they import Transformers and PEFT in every run


def run_script(name: str, *args, env: dict | None = None, check: bool = True, timeout: int = 900):
    """Run scripts/<name> in a new process; return the CompletedProcess (text). The process is forked from a warm
    interpreter (tests/warm_interpreter.py) unless another thread is using it or LORA_SHIP_TEST_FORK=0; then it
    is a plain `python scripts/<name>`."""
    cmd, env = [sys.executable, str(SCRIPTS / name), *map(str, args)], {**os.environ, **(env or {})}
    warm = None
    if os.environ.get("LORA_SHIP_TEST_FORK") != "0":
        flags = ("--transformers",) if name in WITH_TRANSFORMERS else ()
        warm = _warm.get(flags) or _warm.setdefault(flags, WarmInterpreter(*flags))
    if warm is not None and warm.lock.acquire(blocking=False):
        try:
            proc = warm.run(cmd, env, timeout)
        finally:
            warm.lock.release()
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def error_line(proc) -> str:
    """The one-line error a script printed (the last stderr line)."""
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def real_tokenizer(kind: str):
    """A real tokenizer rebuilt from llama.cpp's vocab GGUFs: Llama 2 (spm, 32000), Llama 3 (bpe) or Qwen2 (qwen2).

    Rebuilding takes 40-50 s on 2 cores, so the result is cached on disk."""
    from transformers import AutoTokenizer
    cache = Path(os.environ.get("LORA_SHIP_CACHE", Path.home() / ".cache" / "lora-ship")) / f"test-tokenizer-{kind}"
    if (cache / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cache)
    vocab = {"spm": "llama-spm", "bpe": "llama-bpe"}.get(kind, kind)
    tok = AutoTokenizer.from_pretrained(VOCABS, gguf_file=f"ggml-vocab-{vocab}.gguf")
    if kind == "bpe":
        tok = llama3_tokenizer(tok)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    save_tokenizer(tok, tmp)
    try:
        tmp.rename(cache)
    except OSError:  # the other pytest run of `make test` made it meanwhile
        shutil.rmtree(tmp)
    return AutoTokenizer.from_pretrained(cache)


def vocab_test_cases(vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors for models/ggml-vocab-<vocab>.gguf: (text, ids without BOS)."""
    texts = (VOCABS / f"ggml-vocab-{vocab}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    ids = (VOCABS / f"ggml-vocab-{vocab}.gguf.out").read_text(encoding="utf-8").split("\n")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids)]


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def llama3_tokenizer(gguf_tok):
    """Llama 3's own tokenizer settings, which transformers' GGUF import does not restore: byte-level BPE
    that ignores merges for whole-word vocab hits, Llama 3's split regex, BOS only, EOS <|end_of_text|>."""
    import tempfile
    from transformers import PreTrainedTokenizerFast
    with tempfile.TemporaryDirectory() as tmp:
        gguf_tok.save_pretrained(tmp)
        data = json.loads((Path(tmp) / "tokenizer.json").read_text())
    data["model"].update(byte_fallback=False, ignore_merges=True)
    data["normalizer"] = None
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    data["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(data, f)
    tok = PreTrainedTokenizerFast(tokenizer_file=f.name, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  pad_token="<|end_of_text|>", clean_up_tokenization_spaces=True)
    os.unlink(f.name)
    return tok


def save_tokenizer(tok, folder: Path) -> None:
    tok.save_pretrained(folder)
    # transformers copies the GGUF itself as "tokenizer.model"; it is no SentencePiece model, drop it
    model_file = folder / "tokenizer.model"
    if model_file.exists() and model_file.read_bytes()[:4] == b"GGUF":
        model_file.unlink()


def sentencepiece_model(path: Path, extra_pieces: tuple = ()) -> None:
    """Write Llama 2's SentencePiece tokenizer.model, rebuilt from ggml-vocab-llama-spm.gguf (pieces, scores and
    types, BPE model, byte fallback, dummy prefix), with `extra_pieces` appended as user-defined pieces."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    vocab, _ = read_gguf(VOCABS / "ggml-vocab-llama-spm.gguf")
    proto = pb.ModelProto()
    for text, score, kind in zip(vocab["tokenizer.ggml.tokens"], vocab["tokenizer.ggml.scores"],
                                 vocab["tokenizer.ggml.token_type"]):
        proto.pieces.add(piece=text, score=score, type=kind)  # GGUF's token types are SentencePiece's
    for text in extra_pieces:
        proto.pieces.add(piece=text, score=0.0, type=pb.ModelProto.SentencePiece.USER_DEFINED)
    trainer, normalizer = proto.trainer_spec, proto.normalizer_spec
    trainer.model_type, trainer.vocab_size, trainer.byte_fallback = pb.TrainerSpec.BPE, len(proto.pieces), True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer.name, normalizer.add_dummy_prefix = "identity", True
    normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces = False, True
    path.write_bytes(proto.SerializeToString())


def make_tiny_llama(folder: Path, kind: str = "spm", dtype=torch.float32, seed: int = 0,
                    tie: bool = False, shard: str | None = None, hidden: int = 64):
    """A 2-layer random Llama with a real tokenizer, saved as a Hugging Face folder."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = real_tokenizer(kind)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=tie, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    save_tokenizer(tok, folder)
    if kind == "spm":  # Llama 2 repos ship tokenizer.model beside tokenizer.json; the converter reads it first
        sentencepiece_model(folder / "tokenizer.model")
    return model, tok


def shared_folder(tmp_path_factory, name: str, build) -> Path:
    """A folder that build(folder) fills, made once for both pytest runs of `make test`.

    The Makefile sets LORA_SHIP_TEST_SHARED to a folder it empties before each `make test`: there the first run to
    ask builds it (under a lock, complete when its marker is written) and the other run reuses it. The fixtures
    that use this are seeded, so either run builds the same files. Without the variable (pytest run by hand) each
    call builds into a fresh temporary folder."""
    import fcntl
    root = os.environ.get("LORA_SHIP_TEST_SHARED")
    if not root:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    folder, done = Path(root) / name, Path(root) / f"{name}.done"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(root) / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # left by a run that failed while building it
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


def make_adapter(base_model, folder: Path, seed: int = 1, save_kwargs: dict | None = None, **lora_kwargs):
    """A PEFT LoRA adapter on `base_model` with random, non-zero A and B, saved to `folder` (save_kwargs: more
    arguments of PEFT's save_pretrained)."""
    from peft import LoraConfig, get_peft_model
    import copy
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
    kwargs.update(lora_kwargs)
    model = get_peft_model(copy.deepcopy(base_model), LoraConfig(**kwargs))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
            elif "trainable_tokens_delta" in name:  # starts as a copy of the rows it replaces
                p.add_(torch.randn_like(p) * 0.5)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder, **(save_kwargs or {}))
    return model


# GGUF metadata value types (gguf-py's GGUFValueType) as struct formats; 8 is a string, 9 an array
GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf(path) -> tuple[dict, dict]:
    """(metadata, tensors) of a GGUF file: metadata as Python values by key; tensors by name, each with
    tensor_type, shape (GGUF order) and data (a read-only view, shaped as gguf-py's GGUFReader shapes it).

    gguf-py's GGUFReader makes a numpy view of every string: 14-16 s for a tiny model with Qwen2's 151k-token
    vocabulary on 2 cores, 0.4-0.6 s this way (the test files are small enough to read whole)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return value

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    def value(kind: int):
        if kind == 8:
            return string()
        if kind == 9:
            item, count = take("I"), take("Q")
            return [value(item) for _ in range(count)]
        return take(GGUF_SCALARS[kind])

    assert buf[:4] == b"GGUF", path
    pos = 4
    _, n_tensors, n_kv = take("I"), take("Q"), take("Q")
    metadata = {}
    for _ in range(n_kv):
        key = string()
        metadata[key] = value(take("I"))
    infos = []
    for _ in range(n_tensors):
        name = string()
        shape = [take("Q") for _ in range(take("I"))]
        infos.append((name, shape, GGMLQuantizationType(take("I")), take("Q")))
    align = metadata.get("general.alignment", 32)
    start = -(-pos // align) * align
    plain = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
             GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
             GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
             GGMLQuantizationType.I64: np.int64}
    everything = np.frombuffer(buf, dtype=np.uint8)
    tensors = {}
    for name, shape, kind, offset in infos:
        rows = list(reversed(shape))
        if kind in plain:
            dtype = plain[kind]
        else:  # quantized (and bf16): raw bytes per row, as GGUFReader gives them
            block, size = GGML_QUANT_SIZES[kind]
            dtype, rows[-1] = np.uint8, rows[-1] // block * size
        count = int(np.prod(rows))
        data = everything[start + offset:start + offset + count * np.dtype(dtype).itemsize].view(dtype).reshape(rows)
        tensors[name] = SimpleNamespace(name=name, tensor_type=kind, shape=shape, data=data)
    return metadata, tensors


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 120, headers: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, json.loads(r.read())


@contextlib.contextmanager
def running_server(gguf: Path, tmp: Path, port: int | None = None, extra: tuple = (), env: dict | None = None):
    """Start scripts/serve.py in the background on a free port (extra: more serve.py flags, env: more environment
    for the server); always stop it."""
    port = port or free_port()
    pid_file = tmp / f"server-{port}.pid"
    run_script("serve.py", "start", "--background", "--model", gguf, "--port", port, "--pid-file", pid_file,
               "--log", tmp / f"server-{port}.log", "--engine", "llama-server", "--llama-server", LLAMA_SERVER,
               "--timeout", 120, *extra, env=env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        run_script("serve.py", "stop", "--pid-file", pid_file, check=False)


def admin_headers(tmp: Path, url: str) -> dict:
    """The admin key of the server running_server(gguf, tmp, ...) started at url (serve.py keeps it beside the pid
    file), as request headers: the admin routes (/slots, /metrics, adapter loading) take no other key."""
    key = (tmp / f"server-{url.rsplit(':', 1)[1]}.admin.key").read_text().strip()
    return {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}


def server_log(tmp: Path, url: str) -> str:
    """The log running_server(gguf, tmp, ...) wrote for the server at url."""
    return (tmp / f"server-{url.rsplit(':', 1)[1]}.log").read_text()


def gguf_next_token_logprobs(url: str, prompt_ids: list[int], n_predict: int, n_probs: int):
    """Greedy continuation from the server with the top-`n_probs` log-probabilities at each position: always
    n_predict positions (ignore_eos), so the number compared does not hang on where the answer ends."""
    _, out = http_json(url + "/completion", {"prompt": prompt_ids, "n_predict": n_predict, "temperature": 0,
                                              "n_probs": n_probs, "cache_prompt": False, "ignore_eos": True})
    steps = out["completion_probabilities"]
    generated = [s["id"] for s in steps]
    tops = [{t["id"]: t["logprob"] for t in s["top_logprobs"]} for s in steps]
    return generated, tops


def distribution_agreement(hf_model, prompt_ids: list[int], generated: list[int], tops: list[dict]):
    """Compare the server's top-k next-token distributions with the HF model's on the same tokens.

    Returns (top-1 agreement, mean KL(gguf || hf) over the server's top-k support with the rest of the
    mass lumped into one bucket, number of positions).
    """
    ids = torch.tensor([prompt_ids + generated])
    with torch.no_grad():
        logp = torch.log_softmax(hf_model(ids).logits[0].float(), -1)
    start = len(prompt_ids) - 1
    agree, kls = 0, []
    for i, top in enumerate(tops):
        row = logp[start + i]
        agree += int(int(row.argmax()) == max(top, key=top.get))
        p = torch.tensor([torch.tensor(v).exp() for v in top.values()]).double()
        q = row[list(top.keys())].exp().double()
        p_rest, q_rest = max(1 - float(p.sum()), 1e-12), max(1 - float(q.sum()), 1e-12)
        kl = float((p * (p.log() - q.log())).sum()) + p_rest * (torch.tensor(p_rest).log() -
                                                                 torch.tensor(q_rest).log()).item()
        kls.append(kl)
    return agree / len(tops), sum(kls) / len(kls), len(tops)
