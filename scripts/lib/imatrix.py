"""Importance matrices for llama-quantize: which calibration text, and llama-imatrix run on it, cached.

k-quants and IQ types (Q4_K_M, IQ4_XS, ...) choose each block's scales to minimise the squared error of the
weights; with an importance matrix (the mean squared activation entering each column, from llama-imatrix) the
error is weighted by how much each column matters on real text. The calibration text is, first found:
  --calibration FILE      a .txt used as is, or a tales .jsonl (its training split)
  --dataset FILE          the fine-tune's training data, named by the user (DATASET=)
  the checkpoint's own    the dataset its training_args.json records (train_lora.py writes it)
  data/calibration-general.txt   public-domain American founding texts and two Lincoln speeches (17 KB)
A tales .jsonl gives only its training split (lib/tales.split_tales): the held-out tales `make eval` scores on
are never calibrated on. The matrix is cached as CACHE/imatrix-<model sha256>-<text sha256>-<chunks>.gguf, so
the same model and text are computed once.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from lib.common import ROOT, UserError, atomic_file, log, run_tool

GENERAL_TEXT = ROOT / "data" / "calibration-general.txt"
CTX = 512  # tokens per chunk: llama-imatrix's default
MAX_CHUNKS = 48  # at most this many chunks of calibration (24k tokens): enough for the ranking of columns
CHARS_PER_TOKEN = 4  # rough, to cut the text before tokenizing: llama-imatrix stops at MAX_CHUNKS anyway


def wants_imatrix(key: str) -> bool:
    """k-quant and IQ types use an importance matrix; the legacy Q4_0/Q5_1... and TQ types ignore it."""
    return "_K" in key or key.startswith("IQ") or key == "auto"


def default_cache() -> Path:
    base = os.environ.get("LORA_SHIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lora-ship")
    return Path(base) / "imatrix"


def check_settings(key: str, imatrix: str, calibration: str | Path | None, plan_cost: str = "kl") -> None:
    """IMATRIX, CALIBRATION, PLAN_COST and QUANT together, in one line each (make check runs this before anything
    long)."""
    from lib.quants import PLAN_COSTS
    if plan_cost not in PLAN_COSTS:
        raise UserError(f"PLAN_COST={plan_cost}: expected kl (each group of tensors' KL measured) or weights (the "
                        f"weight error alone, faster)")
    if imatrix not in ("auto", "off"):
        raise UserError(f"IMATRIX={imatrix}: expected auto (an importance matrix for k-quant and IQ types) or off")
    if imatrix == "off" and (key.endswith("+") or key == "auto"):
        raise UserError(f"QUANT={key} plans the tensors by their importance-weighted error: it needs IMATRIX on")
    if calibration and not Path(calibration).is_file():
        raise UserError(f"calibration file {calibration} does not exist")


@dataclass
class Calibration:
    text: str
    source: str  # where it came from, for the log and the GGUF's quantize.imatrix.dataset
    held_out: str = ""  # text to score on that `text` does not contain (QUANT=auto)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


def recorded_dataset(checkpoint: Path | None) -> Path | None:
    """The training data a checkpoint of train_lora.py records (training_args.json), where that file exists."""
    if checkpoint is None or not (Path(checkpoint) / "training_args.json").exists():
        return None
    try:
        name = json.loads((Path(checkpoint) / "training_args.json").read_text()).get("dataset")
    except ValueError:
        return None
    if not name:
        return None
    for path in (Path(name), ROOT / name):  # recorded as given, usually relative to the repository
        if path.is_file():
            return path
    log(f"the checkpoint's training data {name} is not here: calibrating on the general text")
    return None


def tales_text(tales: list[dict]) -> str:
    return "\n\n".join(f"{t['title']}\n\n{t['story']}" for t in tales)


def read_text(path: Path, hold_out: bool = False) -> tuple[str, str]:
    """(calibration text, held-out text) of a file: a tales .jsonl gives its training split and its held-out
    tales; a plain text all of itself, or with hold_out its first four fifths and the last fifth."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist")
    if path.suffix == ".jsonl":
        from lib.tales import load_tales, split_tales
        train, held = split_tales(load_tales(path))
        # spread over the whole set, in a fixed order (by title hash), since only the first chunks are used
        train = sorted(train, key=lambda t: hashlib.sha256(t["title"].encode()).hexdigest())
        text, held_out = tales_text(train), tales_text(held)
    else:
        text, held_out = path.read_text(encoding="utf-8", errors="replace"), ""
        if hold_out:
            cut = text.rfind("\n", 0, len(text) * 4 // 5) + 1 or len(text) * 4 // 5
            text, held_out = text[:cut], text[cut:]
    if not text.strip():
        raise UserError(f"calibration file {path} is empty")
    return text, held_out


def choose_calibration(calibration: Path | None, dataset: Path | None, checkpoint: Path | None,
                       hold_out: bool = False) -> Calibration:
    if calibration is not None:
        path, why = calibration, "CALIBRATION"
    elif dataset is not None:
        path, why = dataset, "the training data (DATASET)"
    elif (recorded := recorded_dataset(checkpoint)) is not None:
        path, why = recorded, "the checkpoint's training data"
    else:
        path, why = GENERAL_TEXT, "the general text (no training data known)"
    text, held_out = read_text(path, hold_out)
    text = text[:MAX_CHUNKS * CTX * CHARS_PER_TOKEN * 2]
    log(f"calibration text: {why}, {path} ({len(text) // 1000} kB used)")
    return Calibration(text, Path(path).name, held_out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def calibration_file(calib: Calibration, cache: Path) -> Path:
    """The calibration text as a file in the cache (written once): llama-imatrix's input, and the text a plan's
    costs are measured on (lib/quant_plan.py)."""
    text_file = Path(cache) / f"{Path(calib.source).stem}-{calib.sha256[:16]}.txt"  # its name is what the GGUF records
    if not text_file.exists():
        text_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(text_file) as tmp:
            tmp.write_text(calib.text, encoding="utf-8")
    return text_file


def compute(model: Path, calib: Calibration, cache: Path, imatrix_bin: Path, logpath: Path,
            chunks: int = MAX_CHUNKS) -> Path:
    """The importance matrix of `model` (a 16-bit GGUF) over the calibration text (its first `chunks` chunks of
    CTX tokens), from the cache if there."""
    if not imatrix_bin.exists():
        raise UserError(f"{imatrix_bin} not found: run 'make vendor' (or IMATRIX=off)")
    out = Path(cache) / f"imatrix-{sha256_file(model)[:16]}-{calib.sha256[:16]}-{chunks}.gguf"
    if out.exists():
        log(f"importance matrix: {out} (cached)")
        return out
    text_file = calibration_file(calib, cache)
    log(f"computing the importance matrix over {Path(calib.source).stem} ...")
    with atomic_file(out) as tmp:
        try:
            run_tool([imatrix_bin, "-m", model, "-f", text_file, "-o", tmp, "--output-format", "gguf",
                      "--ctx-size", CTX, "--batch-size", CTX, "--chunks", chunks, "--no-ppl",
                      "--threads", os.cpu_count() or 1], "llama-imatrix", logpath)
        except UserError:
            if "you need at least" in logpath.read_text(errors="replace")[-4000:]:
                raise UserError(f"the calibration text ({calib.source}) is too short: llama-imatrix needs at "
                                f"least {2 * CTX} tokens") from None
            raise
    return out


class Imatrix:
    """What the quantize step needs to compute (or reuse) an importance matrix; None where it is not wanted.

    Everything checkable is checked here, before the long merge: the tool is built, the text is readable and
    not empty."""

    def __init__(self, calib: Calibration, cache: Path, imatrix_bin: Path, logpath: Path, chunks: int = MAX_CHUNKS,
                 plan_cost: str = "kl"):
        self.calib, self.cache, self.bin, self.logpath, self.chunks = calib, cache, imatrix_bin, logpath, chunks
        self.plan_cost = plan_cost  # what the per-tensor plans made with this matrix minimize (lib/quant_plan.py)

    @classmethod
    def from_args(cls, args, key: str, checkpoint: Path | None, logpath: Path) -> "Imatrix | None":
        check_settings(key, args.imatrix, args.calibration, args.plan_cost)
        if args.imatrix == "off" or not wants_imatrix(key):
            return None
        imatrix_bin = args.llama_cpp / "build" / "bin" / "llama-imatrix"
        if not imatrix_bin.exists():
            raise UserError(f"{imatrix_bin} not found: run 'make vendor' (or IMATRIX=off)")
        scorer = imatrix_bin.with_name("llama-perplexity")  # a plan's KL costs (QUANT=auto needs it anyway)
        if key.endswith("+") and args.plan_cost == "kl" and not scorer.exists():
            raise UserError(f"{scorer} not found: run 'make vendor' (or PLAN_COST=weights)")
        calib = choose_calibration(args.calibration, args.dataset, checkpoint, hold_out=key == "auto")
        if args.imatrix_chunks < 1:
            raise UserError(f"--imatrix-chunks must be at least 1, not {args.imatrix_chunks}")
        return cls(calib, args.imatrix_cache or default_cache(), imatrix_bin, logpath, args.imatrix_chunks,
                   args.plan_cost)

    def __call__(self, model: Path) -> Path:
        return compute(model, self.calib, self.cache, self.bin, self.logpath, self.chunks)

    def text_file(self) -> Path:
        return calibration_file(self.calib, self.cache)


def add_imatrix_args(p) -> None:
    p.add_argument("--imatrix", choices=["auto", "off"], default="auto", help="auto (default): an importance "
                   "matrix for k-quant and IQ types, from the calibration text; off: none")
    p.add_argument("--calibration", type=Path, help="calibration text: a .txt, or a tales .jsonl (its training "
                   "split); default: --dataset, else the checkpoint's recorded training data, else "
                   "data/calibration-general.txt")
    p.add_argument("--dataset", type=Path, help="the fine-tune's training data (tales .jsonl), to calibrate on")
    p.add_argument("--imatrix-chunks", type=int, default=MAX_CHUNKS, help=f"calibrate on at most this many chunks "
                   f"of {CTX} tokens (default: %(default)s)")
    p.add_argument("--imatrix-cache", type=Path, help="folder of computed importance matrices (default: "
                   "~/.cache/lora-ship/imatrix)")
    from lib.quants import PLAN_COSTS
    p.add_argument("--plan-cost", default=PLAN_COSTS[0], help="Q4_K_M+ and the like: kl "
                   "(default): each group of tensors' KL measured on the calibration text at each type; weights: "
                   "the weight error alone (no model runs: far faster on a large model, but blind to a type that "
                   "rounds the fine-tune away, docs/quality.md)")
