"""Tiny random-weight models of each family `make` supports, saved as their Hugging Face repos lay them out.

Each has its family's real architecture class and config quirks (Qwen2's q/k/v biases and tied embeddings,
Gemma 2's soft-capping and 1 + weight norms, Gemma 3's embedding with more rows than the tokenizer has tokens,
which the converter cuts, Phi-3's fused qkv_proj and gate_up_proj), every weight random and
large enough (norms and biases included) that a mistake in any of them changes the logits, and a real
tokenizer: Llama 2's SentencePiece (as tokenizer.model and tokenizer.json, the way Mistral and Phi-3 ship it)
or Qwen2's byte-level BPE, rebuilt from llama.cpp's vocab GGUFs. No Gemma vocabulary ships offline: the Gemma
models use Llama 2's SentencePiece model plus Gemma's two turn tokens, which the architecture does not care about.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from helpers import VOCABS, read_gguf, real_tokenizer, save_tokenizer, sentencepiece_model

MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                    "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}"
                  "{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
                  "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


@dataclass
class Family:
    name: str
    config: str             # the transformers config class
    tokenizer: str          # spm (Llama 2 SentencePiece) or qwen2 (byte-level BPE)
    vocab_test: str | None  # models/ggml-vocab-<this>.gguf.inp/.out: llama.cpp's own tokenizer test vectors
    extra: dict             # config fields of the family
    special_tokens: tuple = ()  # added after the SentencePiece vocabulary, in order
    padded_vocab: int | None = None  # the embedding's rows when the family pads the vocabulary (Phi-3: 32064)


FAMILIES = {
    "mistral": Family("mistral", "MistralConfig", "spm", "llama-spm", {"sliding_window": None}),
    "qwen2": Family("qwen2", "Qwen2Config", "qwen2", "qwen2", {"tie_word_embeddings": True}),
    "qwen3": Family("qwen3", "Qwen3Config", "qwen2", "qwen2", {"tie_word_embeddings": True, "head_dim": 16}),
    "gemma2": Family("gemma2", "Gemma2Config", "spm", None, {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4096, "final_logit_softcapping": 3.0,
        "attn_logit_softcapping": 5.0, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"},
        special_tokens=("<start_of_turn>", "<end_of_turn>")),
    "gemma3": Family("gemma3", "Gemma3TextConfig", "spm", None, {
        "head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 4096, "final_logit_softcapping": None,
        "attn_logit_softcapping": None, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"},
        special_tokens=("<start_of_turn>", "<end_of_turn>"), padded_vocab=32064),  # as Gemma 3: 262208 rows
    "phi3": Family("phi3", "Phi3Config", "spm", "phi-3", {"pad_token_id": 32000},
                   special_tokens=("<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>",
                                   "<|placeholder3|>", "<|placeholder4|>", "<|system|>", "<|end|>",
                                   "<|placeholder5|>", "<|placeholder6|>", "<|user|>"), padded_vocab=32064),
}


def family_tokenizer(family: Family, folder: Path):
    """The family's tokenizer saved into folder (tokenizer.json, its config, and tokenizer.model for spm)."""
    tok = real_tokenizer(family.tokenizer)
    if family.special_tokens:
        from tokenizers import AddedToken
        # Phi-3's own tokenizer strips the whitespace after each added token but <|endoftext|> (llama.cpp does
        # the same for models named phi3/phi-3)
        strip = family.name == "phi3"
        tok.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, rstrip=strip and t != "<|endoftext|>", normalized=False, special=True)
            for t in family.special_tokens]})
    if family.name == "phi3":
        tok.eos_token, tok.pad_token = "<|endoftext|>", "<|endoftext|>"
    if family.name == "mistral" or family.name.startswith("gemma"):
        tok.chat_template = MISTRAL_TEMPLATE if family.name == "mistral" else GEMMA_TEMPLATE
    elif family.name == "phi3":
        tok.chat_template = gguf_chat_template("phi-3")
    save_tokenizer(tok, folder)
    if family.tokenizer == "spm":
        gemma = family.name.startswith("gemma")  # Gemma's turn tokens are pieces of its SentencePiece model
        sentencepiece_model(folder / "tokenizer.model", family.special_tokens if gemma else ())
    return tok


def gguf_chat_template(vocab: str) -> str:
    return read_gguf(VOCABS / f"ggml-vocab-{vocab}.gguf")[0]["tokenizer.chat_template"]


def make_family_model(family: Family, folder: Path, seed: int = 0, dtype=torch.float32):
    """(model, tokenizer): a 2-layer random model of the family, saved to folder with its tokenizer."""
    import transformers
    tok = family_tokenizer(family, folder)
    torch.manual_seed(seed)
    cfg = getattr(transformers, family.config)(
        vocab_size=family.padded_vocab or len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.1,
        **{"tie_word_embeddings": False, **family.extra})
    model = getattr(transformers, "AutoModelForCausalLM").from_config(cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma stores norms as weight - 1: both kinds get visible values
                p.copy_(torch.rand_like(p) * 0.5 + (0.0 if family.name.startswith("gemma") else 0.75))
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    return model, tok
