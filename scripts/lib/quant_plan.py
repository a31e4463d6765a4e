"""Per-tensor quantization plans (QUANT=Q4_K_M+): the bytes of a k-quant mix spent where they cost the least.

llama.cpp's Q4_K_M gives most tensors Q4_K and a fixed set (attn_v, half of ffn_down, output) Q6_K, whatever
the model. A plan instead measures, for every weight matrix and every candidate type (q3_k, q4_k, q5_k, q6_k,
q8_0, or llama-quantize's fallback where the rows do not fit the type's blocks), the error the type makes where
it matters: the importance-weighted squared error of each output row, sum_j imatrix_j (W_rj - Q_rj)^2, the
expected squared error of that output E[((W - Q) x)_r^2] over the calibration activations x (imatrix_j = E[x_j^2]),
times the row's gain on its way to the residual stream (Gains: through attn_output for attn_v, through the
SwiGLU product and ffn_down for ffn_up and ffn_gate), summed. On SmolLM2 + the demo adapter this predicts the
order of the KL that putting each kind of tensor at q3_k costs with a rank correlation of 0.98 (0.64 without the
gains; scripts/tools/plan_proxy_check.py, docs/quality.md).
The quantized values are llama-quantize's own (one --pure run per candidate type, with the same importance
matrix), on an even sample of rows of each tensor (blocks never span rows, so the sample is unbiased): the runs
quantize a small GGUF of only those rows (sample_gguf), which gives the same bytes for them as the whole model
would (k-quants quantize row by row with the per-column importance) at a fraction of the time, then gguf-py reads
them back; a tensor's size in each type is its bytes per row times its rows.
Then, from every tensor at its cheapest type, the upgrades that remove the most error per byte are taken
greedily (on each tensor's lower convex hull of bytes against error) while the file stays within the size of
the plain type (Q4_K_M's own choice of types, read from its run on the sample), and llama-quantize writes the
plan (--tensor-type-file).
The plan goes into the GGUF as lora_ship.quant_plan (JSON) and into the log.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from lib.common import UserError, log, run_tool

CANDIDATES = {"q3_k": "Q3_K_S", "q4_k": "Q4_K_S", "q5_k": "Q5_K_S", "q6_k": "Q6_K", "q8_0": "Q8_0"}  # --pure ftypes
SAMPLE_ROWS = 256  # rows of each tensor whose error is measured
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


def hull(options: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """The lower convex hull of (bytes, error), cheapest first: the types worth their bytes, in order."""
    pts = []
    for o in sorted(set(options), key=lambda o: (o[1], o[2])):
        if pts and o[2] >= pts[-1][2]:  # more bytes, no less error
            continue
        while len(pts) >= 2 and (pts[-1][2] - o[2]) * (pts[-1][1] - pts[-2][1]) >= \
                (pts[-2][2] - pts[-1][2]) * (o[1] - pts[-1][1]):
            pts.pop()
        pts.append(o)
    return pts


def choose(table: dict, budget: int) -> dict[str, str]:
    """{tensor: ggml type} with the sum of bytes within budget and the most error removed per byte."""
    hulls = {name: hull(list(opts.values())) for name, opts in table.items()}
    at = {name: 0 for name in hulls}
    total = sum(h[0][1] for h in hulls.values())
    if total > budget:
        raise UserError(f"the tensors do not fit {budget} bytes even at their smallest candidate types")
    steps = []  # every hull segment by its error removed per byte; a tensor's own segments come in hull order
    for name, h in hulls.items():
        for i in range(1, len(h)):
            steps.append(((h[i - 1][2] - h[i][2]) / (h[i][1] - h[i - 1][1]), name, i))
    for _, name, i in sorted(steps, key=lambda s: -s[0]):
        h = hulls[name]
        if at[name] != i - 1:
            continue  # an earlier segment of this tensor did not fit
        extra = h[i][1] - h[i - 1][1]
        if total + extra <= budget:
            at[name], total = i, total + extra
    return {name: hulls[name][i][0] for name, i in at.items()}


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


def make_plan(f16: Path, imatrix: Path, base: str, quantize_bin: Path, work: Path, logpath: Path,
              table: dict | None = None) -> dict:
    """The plan for `base`'s size: {"base", "bytes", "budget", "types": {tensor: type}} (table: measure_types()'s,
    where it was already made)."""
    work.mkdir(parents=True, exist_ok=True)
    plain = work / f"plain.{base}.gguf"
    sample = sample_gguf(f16, work)
    quantize(quantize_bin, sample, plain, base, imatrix, logpath)
    plain_bytes = tensor_bytes(plain, f16)
    plain.unlink()
    table = table or measure_types(f16, imatrix, quantize_bin, work, logpath, sample)
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


def quantize_with_plan(f16: Path, out: Path, key: str, imatrix: Path, quantize_bin: Path, logpath: Path,
                       table: dict | None = None) -> dict:
    """Quantize f16 into out by the plan for plan_base(key)'s size; return the plan."""
    base = plan_base(key)
    work = out.with_name(out.name + ".plan")
    try:
        plan = make_plan(f16, imatrix, base, quantize_bin, work, logpath, table)
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
