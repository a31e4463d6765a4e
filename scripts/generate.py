#!/usr/bin/env python3
"""Generate text with Hugging Face Transformers from any stage's model, streaming tokens as they come.

  generate.py --model out/merged --load nf4 --prompt "Tell me a fairy tale"
  generate.py --model out/base/smollm2 --adapter quantization/demo-checkpoint   (base + adapter, unmerged)
  generate.py --model out/model.q8_0.gguf                                    (the GGUF, with llama-cpp-python)

--load nf4 (4-bit NormalFloat with double quantization, bf16 compute) or int8 go through BitsAndBytes;
16bit loads bf16. The model's chat template is applied when it has one. Sampling knobs follow seed 000,
checked: a probability such as top_p must lie in (0, 1] (the seed's top_p=90 is refused).
A .gguf model runs through llama-cpp-python (seed 004's engine) on vendor/llama.cpp's own libllama, with the
chat template stored in the GGUF and the same sampling knobs (no_repeat_ngram_size has no llama.cpp twin).
--stats-json writes load seconds, tokens/s, footprint and peak RSS (for compare.py).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import ROOT, UserError, human_bytes, log, run_main  # noqa: E402
from lib.loading import load, load_gguf  # noqa: E402


def check_sampling(args) -> None:
    if args.max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1 (got {args.max_new_tokens})")
    if not 0 < args.top_p <= 1:
        raise UserError(f"top_p is a probability and must lie in (0, 1] (got {args.top_p})")
    if args.temperature <= 0:
        raise UserError(f"temperature must be > 0 (got {args.temperature}); use --greedy for deterministic output")
    if args.top_k < 0:
        raise UserError(f"top_k must be >= 0 (got {args.top_k}; 0 turns it off)")
    if args.no_repeat_ngram_size < 0:
        raise UserError(f"no_repeat_ngram_size must be >= 0 (got {args.no_repeat_ngram_size})")
    if args.num_return_sequences < 1:
        raise UserError(f"num_return_sequences must be >= 1 (got {args.num_return_sequences})")
    if args.num_return_sequences > 1 and args.greedy:
        raise UserError("several return sequences need sampling: drop --greedy")


def stream_gguf(llm, prompt: str, args) -> Iterator[str]:
    sampling = ({"temperature": 0.0} if args.greedy else
                {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p})
    for chunk in llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], stream=True,
                                            max_tokens=args.max_new_tokens, seed=args.seed, **sampling):
        if piece := chunk["choices"][0]["delta"].get("content"):
            yield piece


def generate_gguf(args) -> dict:
    if args.load != "16bit":
        raise UserError(f"--load {args.load} applies to Hugging Face folders; a GGUF is already quantized")
    if args.no_repeat_ngram_size:
        raise UserError("no_repeat_ngram_size has no llama.cpp equivalent: drop it for a GGUF model")
    start = time.perf_counter()
    llm = load_gguf(args.model, args.seed, args.llama_lib)
    loaded = time.perf_counter() - start
    footprint = args.model.stat().st_size
    log(f"loaded {args.model} (llama-cpp-python) in {loaded:.1f} s, model file {human_bytes(footprint)}")
    start, n_new = time.perf_counter(), 0
    for i in range(args.num_return_sequences):
        if args.num_return_sequences > 1:
            print(f"--- sequence {i + 1} ---")
        text = "".join(p for p in stream_gguf(llm, args.prompt, args) if print(p, end="", flush=True) or True)
        print()
        n_new += len(llm.tokenize(text.encode(), add_bos=False, special=False))
    import llama_cpp
    return {"load_seconds": loaded, "tokens": n_new, "seconds": time.perf_counter() - start,
            "footprint_bytes": footprint, "libllama": llama_cpp.llama_cpp._lib._name}


def prompt_ids(tok, prompt: str):
    if tok.chat_template:
        return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_tensors="pt")
    return tok(prompt, return_tensors="pt").input_ids


def generation_kwargs(args) -> dict:
    kw = {"max_new_tokens": args.max_new_tokens, "no_repeat_ngram_size": args.no_repeat_ngram_size,
          "num_return_sequences": args.num_return_sequences}
    if args.greedy:
        kw["do_sample"] = False
    else:
        kw.update(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return kw


def stream(model, tok, ids, kwargs: dict) -> Iterator[str]:
    """Yield decoded text pieces while generate() runs in a background thread."""
    import torch
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    ids = ids.to(model.device)
    errors: list[BaseException] = []

    def work():
        try:
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                               pad_token_id=tok.pad_token_id or tok.eos_token_id, **kwargs)
        except BaseException as e:  # surface it in the caller's thread
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


def generate_hf(args) -> dict:
    import torch
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tok = load(args.model, args.adapter, args.load)
    loaded = time.perf_counter() - start
    footprint = model.get_memory_footprint()
    log(f"loaded {args.model} ({args.load}) in {loaded:.1f} s, memory footprint {human_bytes(footprint)}")
    ids = prompt_ids(tok, args.prompt)
    kwargs = generation_kwargs(args)
    start = time.perf_counter()
    if args.num_return_sequences == 1:
        pieces = [piece for piece in stream(model, tok, ids, kwargs) if print(piece, end="", flush=True) or True]
        print()
        n_new = len(tok(''.join(pieces), add_special_tokens=False).input_ids)
    else:  # streaming shows one sequence at a time; several are printed when done
        with torch.no_grad():
            out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id, **kwargs)
        new = out[:, ids.shape[1]:]
        for i, seq in enumerate(new):
            print(f"--- sequence {i + 1} ---\n{tok.decode(seq, skip_special_tokens=True)}")
        n_new = int(new.numel())
    return {"load_seconds": loaded, "tokens": n_new, "seconds": time.perf_counter() - start,
            "footprint_bytes": footprint}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True,
                   help="Hugging Face model folder (base or merged), or a .gguf file (llama-cpp-python)")
    p.add_argument("--adapter", type=Path, default=None, help="a LoRA checkpoint to apply unmerged")
    p.add_argument("--load", choices=["nf4", "int8", "16bit"], default="16bit")
    p.add_argument("--prompt", default="Tell me a Grimm-style fairy tale about a poor little boy.")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--greedy", action="store_true", help="no sampling (do_sample=False)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-lib", type=Path, default=ROOT / "vendor" / "llama.cpp" / "build" / "bin",
                   help="folder with libllama.so for GGUF models (default: the vendored build)")
    p.add_argument("--stats-json", type=Path, help="write load time, tokens/s, footprint, peak RSS here")
    args = p.parse_args()
    check_sampling(args)
    if args.model.suffix == ".gguf":
        stats = generate_gguf(args)
    else:
        stats = generate_hf(args)
    stats["tokens_per_second"] = stats["tokens"] / stats["seconds"]
    stats["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log(f"{stats['tokens']} tokens in {stats['seconds']:.1f} s ({stats['tokens_per_second']:.1f} tokens/s)")
    if args.stats_json:
        args.stats_json.write_text(json.dumps(stats) + "\n")


if __name__ == "__main__":
    run_main(main)
