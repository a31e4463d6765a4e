"""Importance matrices (lib/imatrix.py): the calibration text chosen, computed once per model and text, and used
by llama-quantize (the GGUF's quantize.imatrix.* keys); never the held-out tales."""
import json
import re
from pathlib import Path

import pytest

from conftest import needs_llama_cpp
from helpers import LLAMA_CPP, ROOT, error_line, make_adapter, make_tiny_llama, read_gguf, run_script

GRIMM = ROOT / "data" / "grimm_stories.jsonl"


def test_calibration_is_the_training_split_never_the_held_out_tales():
    from lib.imatrix import GENERAL_TEXT, read_text
    from lib.tales import load_tales, split_tales
    train, held = split_tales(load_tales(GRIMM))
    text, held_out = read_text(GRIMM)
    assert held and all(t["story"][:200] not in text and t["story"][:200] in held_out for t in held)
    assert all(t["story"][:200] in text and t["story"][:200] not in held_out for t in train)
    plain = GENERAL_TEXT.read_text()
    text, held_out = read_text(GENERAL_TEXT, hold_out=True)  # QUANT=auto scores on the last fifth
    assert text + held_out == plain and len(held_out) < len(plain) / 4 and not held_out.strip() in text


def test_calibration_order(tmp_path):
    from lib.imatrix import GENERAL_TEXT, choose_calibration
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert choose_calibration(None, None, ckpt).source == GENERAL_TEXT.name  # nothing recorded
    (ckpt / "training_args.json").write_text(json.dumps({"dataset": "data/grimm_stories.jsonl"}))
    assert choose_calibration(None, None, ckpt).source == GRIMM.name  # recorded, relative to the repository
    mine = tmp_path / "mine.txt"
    mine.write_text("my text " * 100)
    assert choose_calibration(None, mine, ckpt).text == mine.read_text()  # DATASET= over the record
    assert choose_calibration(mine, GRIMM, ckpt).text == mine.read_text()  # CALIBRATION= over everything


@pytest.fixture(scope="module")
def k_quant_model(tmp_path_factory):
    """A tiny base with rows of 256 (k-quants need them) and an adapter whose training_args.json records the
    Grimm tales, as train_lora.py writes it."""
    tmp = tmp_path_factory.mktemp("imatrix")
    base_model, _ = make_tiny_llama(tmp / "base", "spm", hidden=256)
    make_adapter(base_model, tmp / "ckpts" / "a")
    (tmp / "ckpts" / "a" / "training_args.json").write_text(json.dumps({"dataset": str(GRIMM)}))
    return tmp


def quantize(tmp, out, *extra, check=True):
    return run_script("merge_gguf.py", "--base", tmp / "base", "--checkpoints-dir", tmp / "ckpts", "--out", out,
                      "--quant", "Q4_K_M", "--log", tmp / "q.log", "--imatrix-cache", tmp / "cache",
                      "--imatrix-chunks", 4, *extra, check=check)


@needs_llama_cpp
def test_imatrix_is_computed_once_and_used(k_quant_model):
    tmp = k_quant_model
    first = quantize(tmp, tmp / "a.gguf")
    cached = list((tmp / "cache").glob("imatrix-*.gguf"))
    assert len(cached) == 1 and "computing the importance matrix" in first.stdout
    metadata, _ = read_gguf(tmp / "a.gguf")
    assert metadata["quantize.imatrix.file"].endswith(cached[0].name)
    assert Path(metadata["quantize.imatrix.dataset"]).name.startswith("grimm_stories-")  # the recorded data
    assert metadata["quantize.imatrix.chunks_count"] > 0 and metadata["quantize.imatrix.entries_count"] > 0
    mtime = cached[0].stat().st_mtime_ns
    second = quantize(tmp, tmp / "b.gguf")
    assert "(cached)" in second.stdout and "computing" not in second.stdout
    assert cached[0].stat().st_mtime_ns == mtime
    assert (tmp / "q.log").read_text().count("llama-imatrix -m") == 1  # the tool ran once for the two GGUFs
    assert (tmp / "a.gguf").read_bytes() == (tmp / "b.gguf").read_bytes()


@needs_llama_cpp
def test_imatrix_off_and_errors(k_quant_model, tmp_path):
    tmp = k_quant_model
    quantize(tmp, tmp_path / "off.gguf", "--imatrix", "off")
    metadata, _ = read_gguf(tmp_path / "off.gguf")
    assert metadata["general.file_type"] == 15 and not any(k.startswith("quantize.imatrix") for k in metadata)

    proc = quantize(tmp, tmp_path / "x.gguf", "--imatrix", "off", "--quant", "Q4_K_M+", check=False)
    assert proc.returncode == 1 and "QUANT=Q4_K_M+ plans the tensors" in error_line(proc)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    proc = quantize(tmp, tmp_path / "x.gguf", "--calibration", empty, check=False)
    assert proc.returncode == 1 and error_line(proc).endswith(f"calibration file {empty} is empty")
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a king.\n")
    proc = quantize(tmp, tmp_path / "x.gguf", "--calibration", short, check=False)
    assert proc.returncode == 1 and "too short: llama-imatrix needs at least 1024 tokens" in error_line(proc)
    # a build without llama-imatrix: said before the merge
    fake = tmp_path / "llama.cpp"
    (fake / "build" / "bin").mkdir(parents=True)
    (fake / "build" / "bin" / "llama-quantize").symlink_to(LLAMA_CPP / "build" / "bin" / "llama-quantize")
    proc = quantize(tmp, tmp_path / "x.gguf", "--llama-cpp", fake, check=False)
    assert proc.returncode == 1 and "llama-imatrix not found" in error_line(proc) and "IMATRIX=off" in error_line(proc)
    # and one without llama-perplexity: a plan by KL cannot score, said before the merge
    (fake / "build" / "bin" / "llama-imatrix").symlink_to(LLAMA_CPP / "build" / "bin" / "llama-imatrix")
    proc = quantize(tmp, tmp_path / "x.gguf", "--llama-cpp", fake, "--quant", "Q4_K_M+", check=False)
    assert proc.returncode == 1 and "llama-perplexity not found" in error_line(proc)
    assert "PLAN_COST=weights" in error_line(proc) and "merging" not in proc.stdout
    assert not list(tmp_path.glob("x.gguf*"))



def test_plan_takes_the_least_cost_within_the_budget():
    from lib.quant_plan import choose
    # (type, bytes, cost)
    table = {"big_gain": {"q4": ("q4_k", 100, 50.0), "q6": ("q6_k", 150, 10.0)},
             "small_gain": {"q4": ("q4_k", 100, 50.0), "q6": ("q6_k", 150, 40.0)},
             "dear": {"q4": ("q4_k", 1000, 500.0), "q6": ("q6_k", 1500, 0.0)}}
    assert choose(table, 1200) == {"big_gain": "q4_k", "small_gain": "q4_k", "dear": "q4_k"}
    assert choose(table, 1740) == {"big_gain": "q4_k", "small_gain": "q4_k", "dear": "q6_k"}
    assert choose(table, 1750) == {"big_gain": "q6_k", "small_gain": "q4_k", "dear": "q6_k"}
    assert choose(table, 1300) == {"big_gain": "q6_k", "small_gain": "q6_k", "dear": "q4_k"}
    with pytest.raises(Exception, match="do not fit"):
        choose(table, 1000)
    # coarse steps: the best cost per byte first (small's 0.2) would leave no room for big's upgrade (0.1)
    coarse = {"small": {"q4": ("q4_k", 100, 10.0), "q6": ("q6_k", 150, 0.0)},
              "big": {"q4": ("q4_k", 1000, 100.0), "q6": ("q6_k", 1500, 50.0)}}
    assert choose(coarse, 1600) == {"small": "q4_k", "big": "q6_k"}
    assert choose(coarse, 1649) == {"small": "q4_k", "big": "q6_k"}
    assert choose(coarse, 1650) == {"small": "q6_k", "big": "q6_k"}
    # many tensors: the same least cost as trying every combination
    import itertools
    import random
    rng = random.Random(0)
    many = {f"t{i}": {c: (c, rng.randrange(50, 400), rng.random()) for c in ("a", "b", "c")} for i in range(7)}
    budget = 1200
    best = min((sum(many[n][c][2] for n, c in zip(many, combo)), combo)
               for combo in itertools.product("abc", repeat=7)
               if sum(many[n][c][1] for n, c in zip(many, combo)) <= budget)
    assert choose(many, budget) == dict(zip(many, best[1]))


def test_plan_cost_is_the_group_kl_shared_with_the_weight_error_deciding_ties():
    from lib.quant_plan import calibrate, choose
    table = {f"blk.{i}.attn_q.weight": {"q3_k": ("q4_0", 100, err), "q8_0": ("q8_0", 200, err / 100)}
             for i, err in enumerate([5.0, 50.0, 20.0])}
    table["token_embd.weight"] = {"q3_k": ("q4_0", 300, 1.0), "q8_0": ("q8_0", 600, 0.5)}
    groups = {"attn_q": {"q3_k": 0.03, "q8_0": 0.0}, "token_embd": {"q3_k": 0.05, "q8_0": 0.0}}
    costs = calibrate(table, groups)
    assert costs["blk.0.attn_q.weight"]["q3_k"][2] == pytest.approx(0.01, rel=1e-3)  # a third of the group's KL
    assert costs["token_embd.weight"]["q8_0"][2] == pytest.approx(0.0, abs=1e-6)
    # room for one 100-byte upgrade in attn_q: the layer with the largest weight error
    assert choose(costs, 700) == {"blk.0.attn_q.weight": "q4_0", "blk.1.attn_q.weight": "q8_0",
                                  "blk.2.attn_q.weight": "q4_0", "token_embd.weight": "q4_0"}
    # 300 bytes: the embedding's 0.05 beats all three attn_q layers' 0.03
    assert choose(costs, 900)["token_embd.weight"] == "q8_0"


def held_out_kl(tmp, f16, quantized: list) -> list[float]:
    """Mean KL of each GGUF to the f16 one over held-out tales (llama-perplexity, chunks of 128 tokens)."""
    import subprocess
    from eval_quality import held_out_text, parse_perplexity
    text = tmp / "held_out.txt"
    text.write_text(held_out_text(GRIMM)[:20000])
    bin_dir = LLAMA_CPP / "build" / "bin"
    common = ["-f", str(text), "--ctx-size", "128", "--batch-size", "128", "--chunks", "16",
              "--kl-divergence-base", str(tmp / "f16.kld")]
    subprocess.run([bin_dir / "llama-perplexity", "-m", f16, *common], check=True, capture_output=True)
    return [parse_perplexity(subprocess.run([bin_dir / "llama-perplexity", "-m", q, *common, "--kl-divergence"],
                                            check=True, capture_output=True, text=True).stdout)["kl"]
            for q in quantized]


@needs_llama_cpp
def test_plan_keeps_the_size_and_beats_the_plain_type(k_quant_model, tmp_path):
    tmp = k_quant_model
    quantize(tmp, tmp_path / "plain.gguf")  # the same importance matrix for both (cached)
    quantize(tmp, tmp_path / "plan.gguf", "--quant", "Q4_K_M+")
    metadata, tensors = read_gguf(tmp_path / "plan.gguf")
    plan = json.loads(metadata["lora_ship.quant_plan"])
    assert plan["base"] == "Q4_K_M" and plan["bytes"] <= plan["budget"]
    assert {n: t.tensor_type.name.lower() for n, t in tensors.items() if n in plan["types"]} == plan["types"]
    assert len(set(plan["types"].values())) > 1  # a mix, not one type
    assert "quantize.imatrix.file" in metadata
    size, plain_size = (tmp_path / "plan.gguf").stat().st_size, (tmp_path / "plain.gguf").stat().st_size
    assert abs(size / plain_size - 1) < 0.03
    run_script("merge_gguf.py", "--base", tmp / "base", "--checkpoints-dir", tmp / "ckpts", "--out",
               tmp_path / "f16.gguf", "--quant", "f16")
    # its costs: KL measured on the calibration text (the training split) only
    scored = [line for line in (tmp / "q.log").read_text().splitlines()
              if line.startswith("$ ") and "llama-perplexity" in line]
    assert len(scored) > 9 and all(f" -f {tmp / 'cache'}/grimm_stories-" in line for line in scored)
    plain_kl, plan_kl = held_out_kl(tmp_path, tmp_path / "f16.gguf", [tmp_path / "plain.gguf", tmp_path / "plan.gguf"])
    print(f"held-out KL: plain Q4_K_M {plain_kl:.5f}, plan {plan_kl:.5f}")
    assert plan_kl < plain_kl


@needs_llama_cpp
def test_plan_by_weight_error_alone_runs_no_model(k_quant_model, tmp_path):
    """PLAN_COST=weights: the faster plan for large models, no llama-perplexity run."""
    tmp = k_quant_model
    log = tmp_path / "q.log"
    run_script("merge_gguf.py", "--base", tmp / "base", "--checkpoints-dir", tmp / "ckpts", "--out",
               tmp_path / "plan.gguf", "--quant", "Q4_K_M+", "--plan-cost", "weights", "--log", log,
               "--imatrix-cache", tmp / "cache", "--imatrix-chunks", 4)
    metadata, _ = read_gguf(tmp_path / "plan.gguf")
    plan = json.loads(metadata["lora_ship.quant_plan"])
    assert plan["base"] == "Q4_K_M" and plan["bytes"] <= plan["budget"] and len(set(plan["types"].values())) > 1
    assert "llama-perplexity" not in log.read_text() and "llama-quantize" in log.read_text()


@needs_llama_cpp
def test_plan_measured_on_sampled_rows_equals_the_whole_model(k_quant_model, tmp_path, monkeypatch):
    """The plan's --pure runs quantize a GGUF of only the sampled rows (an 8B model's six whole-model runs took
    minutes); every row comes out as it does in the whole model, so the table (types, bytes, errors) is the same."""
    from lib import quant_plan
    tmp = k_quant_model
    quantize(tmp, tmp_path / "q.gguf")  # the importance matrix, cached
    run_script("merge_gguf.py", "--base", tmp / "base", "--checkpoints-dir", tmp / "ckpts", "--out",
               tmp_path / "f16.gguf", "--quant", "f16")
    imatrix = next((tmp / "cache").glob("imatrix-*.gguf"))
    monkeypatch.setattr(quant_plan, "SAMPLE_ROWS", 48)  # fewer than the tiny model's 256 rows
    bin_ = LLAMA_CPP / "build" / "bin" / "llama-quantize"
    sampled = quant_plan.measure_types(tmp_path / "f16.gguf", imatrix, bin_, tmp_path / "work", tmp_path / "q.log")
    _, sample_tensors = read_gguf(tmp_path / "work" / "sample.gguf")
    assert sample_tensors["blk.0.ffn_down.weight"].data.shape[0] == 48
    whole = {}
    for cand, ftype in quant_plan.CANDIDATES.items():
        whole[cand] = tmp_path / f"whole.{cand}.gguf"
        quant_plan.quantize(bin_, tmp_path / "f16.gguf", whole[cand], ftype, imatrix, tmp_path / "q.log", "--pure")
    full = quant_plan.measure(tmp_path / "f16.gguf", whole, imatrix)
    assert sampled.keys() == full.keys() and len(full) > 10
    for name in full:
        for cand, (ggml_type, n_bytes, err) in full[name].items():
            assert sampled[name][cand][:2] == (ggml_type, n_bytes), name
            assert sampled[name][cand][2] == pytest.approx(err, rel=1e-9), name


def auto_table(stdout: str) -> dict[str, float]:
    return {m[0]: float(m[1]) for m in re.findall(r"^\| (\S+) \| [^|]+ \| ([\d.]+) \|", stdout, re.M)}


@needs_llama_cpp
def test_auto_keeps_the_smallest_within_the_held_out_kl(k_quant_model, tmp_path):
    tmp = k_quant_model
    candidates = ("--candidates", "Q3_K_S,Q4_K_M,Q6_K,Q8_0")  # plans: test_plan_keeps_the_size_...
    proc = quantize(tmp, tmp_path / "none.gguf", "--quant", "auto", "--max-kl", "1e-9", *candidates, check=False)
    assert proc.returncode == 1 and "no candidate is within MAX_KL=1e-09" in error_line(proc)
    kl = auto_table(proc.stdout)  # every candidate tried, none kept
    assert list(kl) == ["Q3_K_S", "Q4_K_M", "Q6_K", "q8_0"] and not (tmp_path / "none.gguf").exists()
    assert kl["q8_0"] < kl["Q3_K_S"]
    # a budget the smallest candidate misses: the first one (small to large) within it
    budget = (kl["Q3_K_S"] + min(kl.values())) / 2
    expected = next(q for q in kl if kl[q] <= budget)
    proc = quantize(tmp, tmp_path / "auto.gguf", "--quant", "auto", "--max-kl", budget, *candidates)
    metadata, _ = read_gguf(tmp_path / "auto.gguf")
    chosen = json.loads(metadata["lora_ship.quant_auto"])
    assert chosen["chosen"] == expected != "Q3_K_S"
    assert [r["quant"] for r in chosen["table"]] == list(kl)[:list(kl).index(expected) + 1]  # stopped there
    assert "quantize.imatrix.file" in metadata and f"| {expected} |" in proc.stdout


@needs_llama_cpp
def test_make_calibrates_caches_and_turns_it_off(k_quant_model):
    from test_make import make
    tmp = k_quant_model
    args = [f"OUT={tmp}/make-out", f"BASE_MODEL={tmp}/base", f"CHECKPOINTS_DIR={tmp}/ckpts", "QUANT=Q4_K_M",
            f"CALIBRATION={ROOT}/data/calibration-general.txt"]
    gguf = tmp / "make-out" / "model.Q4_K_M.gguf"
    proc = make(*args, "merge")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(read_gguf(gguf)[0]["quantize.imatrix.dataset"]).name.startswith("calibration-general-")
    assert len(list((tmp / "make-out" / "imatrix").glob("imatrix-*.gguf"))) == 1
    again = make(*args, "merge")
    assert again.returncode == 0 and "merge_gguf" not in again.stdout  # a file target: nothing to redo
    off = make(*args, "IMATRIX=off", "merge")  # a changed setting makes the GGUF again
    assert off.returncode == 0 and ">>> merge: " in off.stdout
    assert not any(k.startswith("quantize.imatrix") for k in read_gguf(gguf)[0])
