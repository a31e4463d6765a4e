#!/usr/bin/env python3
"""Generate text with Hugging Face Transformers from any stage's model, streaming tokens as they come.

  generate.py --model out/merged --load nf4 --prompt "Tell me a fairy tale"
  generate.py --model out/base/smollm2 --adapter out/demo-checkpoint      (base + adapter, unmerged)

--load nf4 (4-bit NormalFloat with double quantization, bf16 compute) or int8 go through BitsAndBytes;
16bit loads bf16. The model's chat template is applied when it has one. Sampling knobs follow seed 000,
checked: a probability such as top_p must lie in (0, 1] (the seed's top_p=90 is refused).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import UserError, human_bytes, log, run_main  # noqa: E402


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


def load(model_dir: Path, adapter: Path | None, mode: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    quant = {
        "nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16),
        "int8": BitsAndBytesConfig(load_in_8bit=True),
        "16bit": None,
    }[mode]
    kwargs = {"quantization_config": quant} if quant else {"dtype": torch.bfloat16}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    tok = AutoTokenizer.from_pretrained(adapter if adapter and (adapter / "tokenizer_config.json").exists()
                                        else model_dir)
    if adapter:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tok


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="Hugging Face model folder (base or merged)")
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
    args = p.parse_args()
    check_sampling(args)

    import torch
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tok = load(args.model, args.adapter, args.load)
    log(f"loaded {args.model} ({args.load}) in {time.perf_counter() - start:.1f} s, "
        f"memory footprint {human_bytes(model.get_memory_footprint())}")
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
    seconds = time.perf_counter() - start
    log(f"{n_new} tokens in {seconds:.1f} s ({n_new / seconds:.1f} tokens/s)")


if __name__ == "__main__":
    run_main(main)
