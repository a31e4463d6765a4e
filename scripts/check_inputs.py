#!/usr/bin/env python3
"""Check what `make` was given before any long step (building llama.cpp, downloading a base, training the demo
adapter, merging): QUANT, BASE_MODEL, the checkpoint that CHECKPOINTS_DIR / CHECKPOINT select and its
adapter_config.json, the adapter's fit to the base (once the base is a folder on disk: the shapes are read from
the files' headers, no weights), the tokenizer files the merged model will take, and the base the adapter
records (a warning when it names another model). The first problem ends it with one line.

--quick checks only what needs no installed package (QUANT, BASE_MODEL, which checkpoint, its
adapter_config.json, and with --port-free that the port to serve on is free): `make` runs it first, with the
system Python, so a mistake there stops it in a second, before the install and the llama.cpp build start.
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import add_checkpoint_args, log, run_main  # noqa: E402


def adapter_shapes(ckpt: Path) -> dict:
    """name -> object with .shape, from the safetensors header (a .bin adapter is small: it is loaded)."""
    from lib.checkpoints import read_adapter_weights
    from lib.tensor_io import read_header

    st = ckpt / "adapter_model.safetensors"
    if not st.exists():
        return read_adapter_weights(ckpt)
    return {k: types.SimpleNamespace(shape=tuple(v["shape"])) for k, v in read_header(st).items()
            if k != "__metadata__"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", required=True, help="QUANT")
    p.add_argument("--base-model", required=True, help="BASE_MODEL: smollm2, a folder or a hub id")
    p.add_argument("--base", required=True, type=Path, help="the base model folder make uses (may not exist yet)")
    add_checkpoint_args(p, Path("quantization/checkpoints"))
    p.add_argument("--imatrix", default="auto", help="IMATRIX: auto or off")
    p.add_argument("--calibration", default=None, help="CALIBRATION: a text or tales .jsonl file")
    p.add_argument("--plan-cost", default="kl", help="PLAN_COST: kl or weights")
    p.add_argument("--quick", action="store_true", help="only what needs no installed package (no fit, no tokenizer)")
    p.add_argument("--port-free", metavar="HOST:PORT", help="the address to serve on must be free, or held by the "
                   "server of --pid-file")
    p.add_argument("--pid-file", type=Path, help="the pid file of the server that make restarts or keeps")
    p.add_argument("--port-only", action="store_true", help="only --port-free (make serve-adapters: every checkpoint)")
    args = p.parse_args()

    from lib.checkpoints import read_adapter_config, select_checkpoint
    from lib.common import check_base_model
    from lib.merge import check_adapter_config
    from lib.imatrix import check_settings
    from lib.quants import quant_key

    if args.port_free:
        from lib.ports import require_port_free
        host, _, port = args.port_free.rpartition(":")
        require_port_free(host, int(port), args.pid_file)
    if args.port_only:
        return
    quant = quant_key(args.quant)
    check_settings(quant, args.imatrix, args.calibration, args.plan_cost)
    check_base_model(args.base_model)
    ckpt = select_checkpoint(args.checkpoints_dir, args.checkpoint, args.fallback)
    base = args.base if (args.base / "config.json").exists() else None
    cfg = read_adapter_config(ckpt)
    check_adapter_config(cfg)
    if args.quick:
        return
    # the fit and the tokenizer files: torch, safetensors, sentencepiece and tokenizers from the venv
    from lib.merge import check_tokenizer, parse_adapter, plan_merge, recorded_base_differs, tokenizer_source
    from lib.tensor_io import CheckpointReader

    if base is not None:
        pairs, replace = parse_adapter(adapter_shapes(ckpt), cfg)
        base_cfg = json.loads((base / "config.json").read_text())
        plan_merge(CheckpointReader(base), pairs, replace, cfg, base_cfg, None)
        if warning := recorded_base_differs(cfg, base):
            print(warning, file=sys.stderr)
        check_tokenizer(tokenizer_source(base, ckpt), base_cfg)
    elif (ckpt / "tokenizer_config.json").exists():
        check_tokenizer(ckpt)
    demo = " (the shipped demo adapter: no checkpoint of yours was found)" if ckpt == args.fallback else ""
    if base is None:
        note = f"{ckpt}{demo} (its fit is checked once the base is on disk)"
    else:
        note = f"{ckpt}{demo}, fits {base}"
    log(f"inputs ok: QUANT={quant}, BASE_MODEL={args.base_model}, checkpoint {note}")


if __name__ == "__main__":
    run_main(main)
