"""Per-tensor quantization plans (QUANT=Q4_K_M+): the bytes of a k-quant mix spent where they cost the least.

llama.cpp's Q4_K_M gives most tensors Q4_K and a fixed set (attn_v, half of ffn_down, output) Q6_K, whatever
the model. A plan instead measures what each candidate type (q3_k, q4_k, q5_k, q6_k, q8_0, or llama-quantize's
fallback where the rows do not fit the type's blocks) costs each group of tensors (one kind in every layer:
attn_q, ..., ffn_down; token_embd; output), as the KL the model's next-token distribution moves by:
llama-quantize makes the model with that group at that type and every other matrix at q8_0, and llama-perplexity
--kl-divergence scores it against the f16 model on the calibration text (KL_CHUNKS chunks of it; the text the
importance matrix was computed on, never the held-out text that QUANT=auto and make eval score on).
Why measured and not predicted from the weights: a fine-tune's change to a weight is far below the rounding step
of every type (below q8_0's on SmolLM2), yet moves the output a lot, because it points where the output is
sensitive; rounding noise points anywhere. A type that rounds the change away costs much more than its weight
error says. That happens where the base's weights already lie on a quantization grid (a base that came from a
GGUF, as the embedded SmolLM2 does, from Q4_1): a type whose grid holds that grid (q5_1 here) puts the base's
weights back exactly and the fine-tune's change with them. The importance-weighted weight error (measure(), the
plan's first version) ranked q5_1 best on every tensor of such a base and made a plan worse than the plain type
on an adapter of all seven projections (docs/quality.md); the measured KL does not have this blind spot.
A group's KL is shared evenly by its tensors (one type per group, except where the budget runs out inside a
group: there the tensors with the larger weight error go up first, as wherever the KL cannot tell types apart).
Each tensor's size in each type comes from one --pure run per candidate on a GGUF of an even sample of rows of
each matrix (sample_gguf; blocks never span rows, so those rows come out as in the whole model).
Then the types of least total KL whose bytes stay within the size of the plain type (Q4_K_M's own choice of
types, read from its run on the sample) are found exactly (choose()), and llama-quantize writes the plan
(--tensor-type-file). The plan goes into the GGUF as lora_ship.quant_plan (JSON) and into the log.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from lib.common import UserError, log, run_tool

CANDIDATES = {"q3_k": "Q3_K_S", "q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "q8_0": "Q8_0"}  # --pure ftypes
SAMPLE_ROWS = 256  # rows of each tensor whose error is measured
KL_CHUNKS = 4  # chunks of the calibration text each group's KL is measured on
PLAN_KEY = "lora_ship.quant_plan"


def plan_base(key: str) -> str | None:
    """'Q4_K_M' for 'Q4_K_M+' (a plan at that type's size), None for a plain type."""
    return key[:-1] if key.endswith("+") else None


def quantize(quantize_bin: Path, src: Path, dst: Path, ftype: str, imatrix: Path, logpath: Path, *extra) -> None:
    run_tool([quantize_bin, "--imatrix", imatrix, *extra, src, dst, ftype, os.cpu_count() or 1], "llama-quantize",
             logpath)


def importance(imatrix: Path) -> dict[str, np.ndarray]:
    """Mean squared input activation of each column, by weight name, from llama-imatrix's GGUF."""
    from gguf import GGUFReader
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(imatrix).tensors}
    out = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2") and (counts := tensors.get(name[:-len(".in_sum2")] + ".counts")) is not None:
            out[name[:-len(".in_sum2")]] = (sums.reshape(-1) / max(float(counts.reshape(-1)[0]), 1.0))
    return out


def n_rows_of(tensor) -> int:
    return int(np.prod(tensor.shape[1:]))


def sample_rows(n_rows: int) -> np.ndarray:
    """The rows of an n_rows tensor whose error is measured: SAMPLE_ROWS evenly spread (all of a smaller one)."""
    return np.unique(np.linspace(0, n_rows - 1, min(SAMPLE_ROWS, n_rows)).astype(np.int64))


def sampled(tensor, rows: np.ndarray) -> np.ndarray:
    """rows of a tensor from the whole model, or all of the same tensor in a sample_gguf file, as float32."""
    return rows_of(tensor, rows if n_rows_of(tensor) > len(rows) else np.arange(len(rows)))


def full_bytes(tensor, n_rows: int) -> int:
    """A tensor's bytes in the whole model, from it or its sample (every row of a type has the same bytes)."""
    return int(tensor.n_bytes) // n_rows_of(tensor) * n_rows


def rows_of(tensor, rows: np.ndarray) -> np.ndarray:
    """Those rows of a GGUF tensor, as float32 (n_rows, n_cols)."""
    from gguf.quants import dequantize
    data = np.asarray(tensor.data)
    data = data.reshape(-1, data.shape[-1])[rows]
    return dequantize(data, tensor.tensor_type).astype(np.float32).reshape(len(rows), -1)


def head_counts(reader) -> tuple[int, int]:
    """(attention heads, key/value heads) from a GGUF's metadata (1, 1 where it has none)."""
    arch = reader.fields["general.architecture"].contents()
    heads = reader.fields.get(f"{arch}.attention.head_count")
    kv = reader.fields.get(f"{arch}.attention.head_count_kv")
    n_head = int(heads.contents()) if heads is not None else 1
    return n_head, int(kv.contents()) if kv is not None else n_head


class Gains:
    """How much a unit of error in each output row of a tensor weighs where it lands: the residual stream.

    attn_output and ffn_down write into it directly (1). attn_v's rows reach it through attn_output: row r of
    key/value head k feeds column (h, d) of attn_output for each query head h sharing k (GQA), so its gain is the
    sum of those columns' squared norms. ffn_up's and ffn_gate's rows reach it through the SwiGLU product h and
    ffn_down: gain_r = |ffn_down[:, r]|^2 * E[h_r^2] / E[out_r^2], with E[h_r^2] from the importance matrix of
    ffn_down and E[out_r^2] the row's own expected output. attn_q and attn_k act through the softmax (1)."""

    def __init__(self, ref: dict, weights: dict, n_head: int, n_kv: int):
        self.ref, self.weights, self.n_head, self.n_kv = ref, weights, n_head, n_kv

    def col_sq(self, name: str) -> np.ndarray | None:
        t = self.ref.get(name)
        if t is None:
            return None
        n_rows = int(np.prod(t.shape[1:]))
        return (rows_of(t, np.arange(n_rows)).astype(np.float64) ** 2).sum(axis=0)

    def __call__(self, name: str, rows: np.ndarray, w: np.ndarray, col_weight: np.ndarray) -> np.ndarray:
        ones = np.ones(len(rows))
        layer, _, kind = name.rpartition(".")[0].rpartition(".")
        if kind == "attn_v":
            col = self.col_sq(f"{layer}.attn_output.weight")
            n_v = int(np.prod(self.ref[name].shape[1:]))
            if col is None or n_v % self.n_kv or col.shape[0] != self.n_head * (n_v // self.n_kv):
                return ones
            head_dim, group = n_v // self.n_kv, self.n_head // self.n_kv
            per_head = col.reshape(self.n_kv, group, head_dim).sum(axis=1).reshape(-1)  # q heads of each kv head
            return per_head[rows]
        if kind in ("ffn_up", "ffn_gate"):
            col = self.col_sq(f"{layer}.ffn_down.weight")
            h2 = self.weights.get(f"{layer}.ffn_down.weight")
            if col is None or h2 is None or col.shape[0] != int(np.prod(self.ref[name].shape[1:])):
                return ones
            out2 = (w.astype(np.float64) ** 2) @ col_weight
            return col[rows] * h2[rows] / np.maximum(out2, 1e-12)
        return ones


def measure(f16: Path, pure: dict[str, Path], imatrix: Path,
            sample: Path | None = None) -> dict[str, dict[str, tuple[str, int, float]]]:
    """{tensor: {candidate: (actual ggml type, bytes, error)}} for every quantized tensor: the importance-weighted
    squared error of each output row, times the row's gain (Gains), summed. The pure files are quantized from f16
    or from its sample_gguf (then given as sample)."""
    from gguf import GGUFReader
    weights = importance(imatrix)
    reader = GGUFReader(f16)
    ref = {t.name: t for t in reader.tensors}
    src = {t.name: t for t in GGUFReader(sample).tensors} if sample else ref
    gains = Gains(ref, weights, *head_counts(reader))
    readers = {c: {t.name: t for t in GGUFReader(p).tensors} for c, p in pure.items()}
    table = {}
    for name, t in ref.items():
        quantized = {c: r[name] for c, r in readers.items() if r[name].tensor_type.name not in ("F32", "F16", "BF16")}
        if len(t.shape) != 2 or not quantized:
            continue
        n_rows = n_rows_of(t)
        rows = sample_rows(n_rows)
        w = sampled(src[name], rows)
        col_weight = weights.get(name)
        if col_weight is None or col_weight.shape[0] != w.shape[1]:  # token_embd: a lookup, no activations
            col_weight = np.ones(w.shape[1])
        row_gain = gains(name, rows, w, col_weight) * (n_rows / len(rows))
        table[name] = {c: (q.tensor_type.name.lower(), full_bytes(q, n_rows),
                           float((((w - sampled(q, rows)) ** 2) @ col_weight) @ row_gain))
                       for c, q in quantized.items()}
    return table


def choose(table: dict, budget: int) -> dict[str, str]:
    """{tensor: ggml type} with the least total cost whose bytes fit the budget. Exact: after each tensor only
    the choices so far that no other beats on both bytes and cost are kept (the Pareto front; a few thousand
    on a 30-layer model), then the cheapest is traced back. A greedy by cost per byte leaves bytes unspent
    where steps are coarse (an embedding that is most of a small model)."""
    names = list(table)
    options = [list(table[name].values()) for name in names]
    nbytes, cost, trail = np.zeros(1, np.int64), np.zeros(1), []
    for opts in options:
        b = (nbytes[:, None] + np.array([o[1] for o in opts], np.int64)[None, :]).ravel()
        c = (cost[:, None] + np.array([o[2] for o in opts], np.float64)[None, :]).ravel()
        fits = np.nonzero(b <= budget)[0]
        if not len(fits):
            raise UserError(f"the tensors do not fit {budget} bytes even at their smallest candidate types")
        order = fits[np.lexsort((c[fits], b[fits]))]  # by bytes, then cost
        cheaper_before = np.minimum.accumulate(np.concatenate(([np.inf], c[order][:-1])))
        front = order[c[order] < cheaper_before]  # less cost than every choice of fewer bytes
        trail.append(front)
        nbytes, cost = b[front], c[front]
    at, types = int(np.argmin(cost)), {}
    for name, opts, front in zip(reversed(names), reversed(options), reversed(trail)):
        at, pick = divmod(int(front[at]), len(opts))
        types[name] = opts[pick][0]
    return {name: types[name] for name in names}


def group_of(name: str) -> str:
    """A tensor's group: its kind, the same in every layer (blk.3.attn_q.weight: attn_q)."""
    return re.sub(r"^blk\.\d+\.", "", name).removesuffix(".weight")


def measure_groups(f16: Path, imatrix: Path, table: dict, text: Path, bin_dir: Path, work: Path,
                   logpath: Path, chunks: int = KL_CHUNKS) -> dict[str, dict[str, float]]:
    """{group: {candidate: KL increase}} for the table's candidates: the mean KL to f16 on `text` of the model
    with that group at the candidate's types (table's) and every other matrix at q8_0, less that of the model all
    at q8_0 (as measured: below 0 is noise)."""
    from lib.quant_auto import CTX, mean_kl
    work.mkdir(parents=True, exist_ok=True)
    threads = os.cpu_count() or 1
    common = ["-f", text, "--ctx-size", CTX, "--batch-size", CTX, "--chunks", chunks, "--threads", threads,
              "--kl-divergence-base", work / "f16.kld"]
    run_tool([bin_dir / "llama-perplexity", "-m", f16, *common], "llama-perplexity", logpath)
    model, type_file = work / "group.gguf", work / "group-types.txt"
    all_q8 = {name: "q8_0" for name in table}

    def kl(types: dict[str, str]) -> float:
        write_type_file({"types": types}, type_file)
        quantize(bin_dir / "llama-quantize", f16, model, "Q8_0", imatrix, logpath, "--tensor-type-file", type_file)
        return mean_kl(bin_dir / "llama-perplexity", model, common, logpath)[0]

    groups: dict[str, dict[str, float]] = {}
    for name in table:
        groups.setdefault(group_of(name), {})
    candidates = list(next(iter(table.values())))
    log(f"plan: measuring the KL of {len(groups)} groups of tensors at {len(candidates) - 1} types each "
        f"(llama-quantize + llama-perplexity on {chunks} chunks of {text.name})")
    try:
        floor = kl(all_q8)
        log(f"  every matrix at q8_0: KL {floor:.5f}")
        for group, costs in groups.items():
            members = [n for n in table if group_of(n) == group]
            for cand in candidates:
                types = {n: table[n][cand][0] for n in members}
                if all(t == "q8_0" for t in types.values()):
                    costs[cand] = 0.0  # the candidate falls back to q8_0 for these rows (q6_k on 576-wide ones)
                    continue
                costs[cand] = kl({**all_q8, **types}) - floor
            log(f"  {group}: KL " + ", ".join(f"{c} {v:.5f}" for c, v in costs.items()))
    finally:
        for path in (model, type_file, work / "f16.kld"):
            path.unlink(missing_ok=True)
    return groups


def calibrate(table: dict, groups: dict[str, dict[str, float]]) -> dict:
    """table with each option's cost the KL its group measured, shared evenly by the group's tensors, plus its
    weight error scaled far below any KL difference measured: where the KL cannot tell two options apart (both
    measured within noise of q8_0, or tensors of one group), the weight error decides, and bytes the KL does
    not want are still spent."""
    sizes: dict[str, int] = {}
    for name in table:
        sizes[group_of(name)] = sizes.get(group_of(name), 0) + 1
    kl = {name: {c: max(groups[group_of(name)][c], 0.0) / sizes[group_of(name)] for c in opts}  # below 0: noise
          for name, opts in table.items()}
    steps = [abs(a - b) for costs in kl.values() for a in costs.values() for b in costs.values() if a != b]
    most = max((o[2] for opts in table.values() for o in opts.values()), default=0.0) * len(table)
    scale = 1e-3 * min(steps, default=1.0) / most if most > 0 else 0.0
    return {name: {c: (t, b, kl[name][c] + scale * err) for c, (t, b, err) in opts.items()}
            for name, opts in table.items()}


def copy_gguf(src: Path, dst: Path, values: dict[str, str] | None = None, rows: bool = False) -> None:
    """dst: src's keys, more string keys (values), and its tensors as they are, or (rows) only each matrix's
    sample_rows (a file llama-quantize takes like the whole model: its types depend on names and columns)."""
    import gguf
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    for key, value in (values or {}).items():
        writer.add_string(key, value)

    def data(t):
        if not rows or len(t.shape) != 2:
            return t.data
        picked = sample_rows(n_rows_of(t))
        return np.asarray(t.data).reshape(-1, t.data.shape[-1])[picked]

    for t in reader.tensors:
        d = data(t)
        writer.add_tensor_info(t.name, d.shape, d.dtype, d.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(data(t))
    writer.close()


def add_metadata(src: Path, dst: Path, values: dict[str, str]) -> None:
    """dst: src with more string keys (gguf-py copies the tensors as they are)."""
    copy_gguf(src, dst, values)


def tensor_bytes(path: Path, f16: Path) -> dict[str, int]:
    """Each tensor's bytes in the whole model, from path (quantized from f16 or from its sample)."""
    from gguf import GGUFReader
    n_rows = {t.name: n_rows_of(t) for t in GGUFReader(f16).tensors}
    return {t.name: full_bytes(t, n_rows[t.name]) for t in GGUFReader(path).tensors}


@contextlib.contextmanager
def row_sample(f16: Path, work: Path, sample: Path | None = None):
    """sample where given (its maker deletes it), else a sample_gguf of f16 deleted afterwards."""
    if sample is not None:
        yield sample
        return
    made = sample_gguf(f16, work)
    try:
        yield made
    finally:
        made.unlink(missing_ok=True)


def sample_gguf(f16: Path, work: Path) -> Path:
    """work/sample.gguf, written afresh (a work folder left by a killed run may hold another model's): f16 with
    only the measured rows of each matrix."""
    sample = work / "sample.gguf"
    copy_gguf(f16, work / "sample.gguf.tmp", rows=True)
    (work / "sample.gguf.tmp").replace(sample)
    return sample


def measure_types(f16: Path, imatrix: Path, quantize_bin: Path, work: Path, logpath: Path,
                  sample: Path | None = None) -> dict:
    """measure()'s table from one --pure llama-quantize run per candidate type on f16's sample (sample_gguf's,
    made here unless given; the runs deleted afterwards)."""
    work.mkdir(parents=True, exist_ok=True)
    sample = sample or sample_gguf(f16, work)
    pure = {cand: work / f"pure.{cand}.gguf" for cand in CANDIDATES}
    try:
        for cand, ftype in CANDIDATES.items():
            quantize(quantize_bin, sample, pure[cand], ftype, imatrix, logpath, "--pure")
        return measure(f16, pure, imatrix, sample)
    finally:
        for path in pure.values():
            path.unlink(missing_ok=True)


def plan_table(f16: Path, imatrix: Path, text: Path, bin_dir: Path, work: Path, logpath: Path,
               cost: str = "kl", sample: Path | None = None) -> dict:
    """{tensor: {candidate: (type, bytes, cost)}}, what a plan chooses from (shared by the plans QUANT=auto
    tries): cost "kl", calibrate()'s; "weights", measure()'s weight error (sample: row_sample's)."""
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    with row_sample(f16, work, sample) as rows:
        table = measure_types(f16, imatrix, bin_dir / "llama-quantize", work, logpath, rows)
    if cost == "kl":
        table = calibrate(table, measure_groups(f16, imatrix, table, text, bin_dir, work, logpath))
    log(f"plan: costs measured in {time.perf_counter() - start:.0f} s")
    return table


def make_plan(f16: Path, imatrix: Path, base: str, table: dict, quantize_bin: Path, work: Path,
              logpath: Path, sample: Path | None = None) -> dict:
    """The plan for `base`'s size from plan_table()'s table: {"base", "bytes", "budget", "types": {tensor: type}}
    (sample: row_sample's)."""
    work.mkdir(parents=True, exist_ok=True)
    plain = work / f"plain.{base}.gguf"
    with row_sample(f16, work, sample) as rows:
        quantize(quantize_bin, rows, plain, base, imatrix, logpath)
    plain_bytes = tensor_bytes(plain, f16)
    plain.unlink()
    budget = sum(plain_bytes[n] for n in table)  # the planned tensors' bytes in the plain type
    types = choose(table, budget)
    planned = sum(next(o[1] for o in table[n].values() if o[0] == t) for n, t in types.items())
    log(f"plan for {base}'s size: {planned / 2**20:.1f} MiB of weight matrices for a budget of "
        f"{budget / 2**20:.1f} MiB; types: {summary(types)}")
    return {"base": base, "bytes": planned, "budget": budget, "types": types}


def summary(types: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return ", ".join(f"{n} {t}" for t, n in sorted(counts.items()))


def write_type_file(plan: dict, path: Path) -> None:
    path.write_text("".join(f"^{name.replace('.', chr(92) + '.')}$={t}\n" for name, t in plan["types"].items()))


def quantize_with_plan(f16: Path, out: Path, key: str, imatrix: Path, text: Path, bin_dir: Path, logpath: Path,
                       table: dict | None = None, cost: str = "kl") -> dict:
    """Quantize f16 into out by the plan for plan_base(key)'s size, its costs measured on the calibration text
    (table: plan_table()'s, where it was already made); return the plan."""
    base = plan_base(key)
    work = out.with_name(out.name + ".plan")
    quantize_bin = bin_dir / "llama-quantize"
    try:
        work.mkdir(parents=True, exist_ok=True)
        sample = sample_gguf(f16, work)  # one row sample for the costs and the plain type's bytes
        table = table or plan_table(f16, imatrix, text, bin_dir, work, logpath, cost, sample)
        plan = make_plan(f16, imatrix, base, table, quantize_bin, work, logpath, sample)
        type_file = work / "tensor-types.txt"
        write_type_file(plan, type_file)
        mid = work / "planned.gguf"
        quantize(quantize_bin, f16, mid, base, imatrix, logpath, "--tensor-type-file", type_file)
        add_metadata(mid, out, {PLAN_KEY: json.dumps(plan, separators=(",", ":"))})
        log(f"plan written to {out.name} ({PLAN_KEY})")
    finally:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return plan
