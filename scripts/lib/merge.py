"""The merged model, one tensor at a time: what both writers (merge_gguf.py into a GGUF, merge_lora.py into a
Hugging Face folder) read from.

An adapter is parsed as PEFT saves it (LoRA pairs, modules_to_save and resized vocabularies in each layout,
trainable tokens), checked against its base, and each merged tensor is computed when asked for: the base tensor
plus the LoRA delta in float32 (lib/lora_math.py), rounded once to the output dtype. Also here: the side files
a merged model carries (config, tokenizer, merge_info.json) and the checks and names both writers share.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

from lib.common import UserError, squashed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")
PREFIX = "base_model.model."
# how quantized uploads of a base are named (Unsloth's -bnb-4bit, GPTQ, AWQ): the same model for the merge
QUANTIZED_SUFFIX = r"(-unsloth)?(-bnb)?-[48]bit$|-(gptq|awq)(-int[48])?$"
# adapter_config.json switches this merge does not implement: refuse rather than merge wrong
UNSUPPORTED = {"lora_bias": "LoRA bias terms", "layer_replication": "layer replication",
               "target_parameters": "target_parameters", "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA"}
TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"  # PEFT's trainable tokens: new values of some rows
# config.json "architectures" whose converter class in the pinned llama.cpp (conversion/*.py, set_vocab) reads
# tokenizer.model with no fallback to tokenizer.json: _set_vocab_sentencepiece / _create_vocab_sentencepiece
# unguarded (FileNotFoundError), or its own copy of it (ValueError / sys.exit). Phi-3's class takes a
# tokenizer_class GPT2Tokenizer (Phi-4) through tokenizer.json instead. Gemma 3, Llama, Mistral, Qwen2, DeepSeek,
# Grok, Jamba, Mamba, MPT, OpenELM, RWKV fall back when the file is missing; T5 and the TTS models are not
# causal LMs this pipeline merges.
SENTENCEPIECE_ONLY = {
    "ArcticForCausalLM", "BaichuanForCausalLM", "BaiChuanForCausalLM", "BitnetForCausalLM", "BitNetForCausalLM",
    "Ernie4_5ForCausalLM", "Ernie4_5_ForCausalLM", "Ernie4_5_MoeForCausalLM", "PaddleOCRVLForConditionalGeneration",
    "GemmaForCausalLM", "Gemma2ForCausalLM", "InternLM2ForCausalLM", "InternLM3ForCausalLM", "MiniCPMForCausalLM",
    "MiniCPM3ForCausalLM", "NemotronForCausalLM", "OrionForCausalLM", "PanguEmbeddedForCausalLM",
    "Phi3ForCausalLM", "Phi4ForCausalLMV", "PhiMoEForCausalLM", "PlamoForCausalLM"}


def check_adapter_config(cfg: dict) -> None:
    """Refuse adapter_config.json switches the merge does not implement, rather than merge wrong."""
    for key, what in UNSUPPORTED.items():
        if cfg.get(key):
            raise UserError(f"this adapter uses {what} ({key}={cfg[key]!r}), which the merge does not support")
    if cfg.get("bias", "none") != "none":
        raise UserError(f"this adapter trains biases (bias={cfg['bias']!r}), which the merge does not support")


def parse_adapter(weights: dict, cfg: dict) -> tuple[dict, dict]:
    """Split adapter tensors into LoRA pairs per module and whole-tensor replacements (modules_to_save).
    Only the tensors' shapes are read here (check_inputs.py passes shapes alone)."""
    check_adapter_config(cfg)
    pairs: dict[str, dict] = {}
    replace: dict[str, object] = {}
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "emb_A",
                ".lora_embedding_B": "emb_B", ".lora_magnitude_vector": "magnitude"}
    for key, tensor in weights.items():
        if not key.startswith(PREFIX):
            raise UserError(f"adapter tensor {key!r} is not in PEFT's layout (expected a '{PREFIX}' prefix)")
        name = key[len(PREFIX):]
        if ".original_module." in name:  # PEFT's copy of the layer as it was, beside its modules_to_save copy
            continue
        # a modules_to_save layer: saved as X.weight, and with embedding layers also as X.modules_to_save.weight
        name = name.replace(".modules_to_save.", ".")
        for suffix, role in suffixes.items():
            if name.endswith(suffix):
                pairs.setdefault(name[: -len(suffix)], {})[role] = tensor
                break
        else:
            if name.endswith(TOKENS_SUFFIX):
                module = name[: -len(TOKENS_SUFFIX)]
                pairs.setdefault(module, {}).update(tokens=tensor, token_ids=trained_token_ids(module, cfg))
                continue
            if name.endswith(".base_layer.weight"):  # saved with embedding layers: replaces the base tensor
                name = name[: -len(".base_layer.weight")] + ".weight"
            replace[name] = tensor
    for module, parts in pairs.items():
        if "tokens" in parts:
            if len(parts) > 2:
                raise UserError(f"adapter module {module} has trainable tokens and LoRA matrices at once, which the "
                                f"merge does not support")
            continue
        linear, emb = {"A", "B"} <= parts.keys(), {"emb_A", "emb_B"} <= parts.keys()
        if not (linear or emb):
            raise UserError(f"adapter module {module} has {sorted(parts)} but not both LoRA matrices A and B")
        if emb and "magnitude" in parts:
            raise UserError(f"DoRA on the embedding layer {module} is not supported")
    return pairs, replace


def trained_token_ids(module: str, cfg: dict) -> list[int]:
    """The rows PEFT's trainable tokens replace in `module`: trainable_token_indices is a list (for the input
    embedding) or {layer name: list}."""
    spec = cfg.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = next((ids for layer, ids in spec.items() if module == layer or module.endswith("." + layer)), None)
    if not isinstance(spec, list) or not all(isinstance(i, int) for i in spec):
        raise UserError(f"the adapter trains tokens of {module}, but adapter_config.json's trainable_token_indices "
                        f"does not list them ({cfg.get('trainable_token_indices')!r})")
    return spec


def plan_merge(base, pairs: dict, replace: dict, cfg: dict, base_cfg: dict, out_dtype):
    """Check that the adapter fits the base and return the write plan [(name, dtype, shape)]."""
    trained_on = cfg.get("base_model_name_or_path") or "an unnamed base"
    for module, parts in pairs.items():
        key = module + ".weight"
        if key not in base:
            raise UserError(f"adapter (trained on {trained_on}) targets {module}, which the base model "
                            f"{base.folder} does not have")
        shape = list(replace[key].shape) if key in replace else base.shape(key)
        if "tokens" in parts:
            ids, values = parts["token_ids"], list(parts["tokens"].shape)
            if values != [len(ids), shape[1]] or max(ids, default=0) >= shape[0] or min(ids, default=0) < 0:
                raise UserError(f"adapter (trained on {trained_on}) does not fit base {base.folder}: its trainable "
                                f"tokens of {module} are {values} for token ids up to {max(ids, default=0)}, the "
                                f"base's {key} is {shape}")
            continue
        if "A" in parts:
            out_f, in_f = parts["B"].shape[0], parts["A"].shape[1]
            want = [in_f, out_f] if cfg.get("fan_in_fan_out") else [out_f, in_f]
            rank_ok = parts["A"].shape[0] == parts["B"].shape[1]
        else:
            want = [parts["emb_A"].shape[1], parts["emb_B"].shape[0]]
            rank_ok = parts["emb_A"].shape[0] == parts["emb_B"].shape[1]
        if want != shape or not rank_ok:
            raise UserError(f"adapter (trained on {trained_on}) does not fit base {base.folder}: {module} is "
                            f"{shape} in the base but the adapter's LoRA matrices make {want}")
    for key, tensor in replace.items():
        if key not in base:
            raise UserError(f"adapter tensor {key} (trained on {trained_on}) matches nothing in base {base.folder}")
        shape, new = base.shape(key), list(tensor.shape)
        resized_vocab = key.endswith(("embed_tokens.weight", "lm_head.weight")) and new[1:] == shape[1:]
        if new != shape and not resized_vocab:
            raise UserError(f"adapter (trained on {trained_on}) does not fit base {base.folder}: {key} is "
                            f"{shape} in the base but {new} in the adapter")
    if base_cfg.get("tie_word_embeddings") and "lm_head.weight" not in base and (
            "lm_head.weight" in replace or "lm_head" in pairs):
        raise UserError("the base ties lm_head to embed_tokens, but the adapter changes lm_head on its own")
    plan = []
    for key in base.keys():
        shape = list(replace[key].shape) if key in replace else base.shape(key)
        dtype = base.dtype(key)
        if out_dtype is not None and dtype.is_floating_point:
            dtype = out_dtype
        plan.append((key, dtype, shape))
    vocab = {shape[0] for key, _, shape in plan if key.endswith(("embed_tokens.weight", "lm_head.weight"))}
    if len(vocab) > 1:
        raise UserError(f"embed_tokens and lm_head disagree on the vocabulary size after merging: {sorted(vocab)}")
    return plan, (vocab.pop() if vocab else None)


class MergedSource:
    """The merged model, tensor by tensor, computed on demand from the base and the adapter.

    `tensor(key)` is what the merged Hugging Face model holds under `key` (rounded once to the output dtype);
    `rows(key, a, b)` is the same for a range of rows, so a writer can stream a 2 GB embedding in pieces.
    Both the safetensors writer below and merge_gguf.py read the merge from here.
    """

    def __init__(self, base_dir: Path, ckpt: Path, out_dtype_name: str = "auto"):
        import torch

        from lib.checkpoints import read_adapter_config, read_adapter_weights
        from lib.lora_math import LoraConfig
        from lib.tensor_io import CheckpointReader

        self.base_dir, self.ckpt = Path(base_dir), Path(ckpt)
        self.adapter_cfg = read_adapter_config(ckpt)
        self.lora = LoraConfig.from_dict(self.adapter_cfg)
        self.base_cfg = json.loads((self.base_dir / "config.json").read_text())
        self.base = CheckpointReader(self.base_dir)
        check_tokenizer(tokenizer_source(self.base_dir, self.ckpt), self.base_cfg)
        if warning := recorded_base_differs(self.adapter_cfg, self.base_dir):
            print(warning, file=sys.stderr)
        self.pairs, self.replace = parse_adapter(read_adapter_weights(ckpt), self.adapter_cfg)
        self.out_dtype = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16,
                          "fp32": torch.float32}[out_dtype_name]
        self.plan, self.vocab = plan_merge(self.base, self.pairs, self.replace, self.adapter_cfg, self.base_cfg,
                                           self.out_dtype)
        self.dtypes = {key: dtype for key, dtype, _ in self.plan}
        self.shapes = {key: shape for key, _, shape in self.plan}

    def config(self) -> dict:
        """config.json of the merged model."""
        cfg = dict(self.base_cfg)
        if self.vocab is not None:
            cfg["vocab_size"] = self.vocab
        if self.out_dtype is not None:  # transformers 4.56+ writes "dtype", older versions "torch_dtype"
            cfg["dtype"] = cfg["torch_dtype"] = str(self.out_dtype).removeprefix("torch.")
        return cfg

    def _lora(self, key: str):
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        return module, self.pairs.get(module)

    def can_split_rows(self, key: str) -> bool:
        """Whether rows() works piecewise: DoRA norms and fan_in_fan_out need the whole matrix."""
        _, parts = self._lora(key)
        return len(self.shapes[key]) == 2 and (parts is None or (
            "magnitude" not in parts and not ("A" in parts and self.lora.fan_in_fan_out)))

    def tensor(self, key: str):
        return self.rows(key, 0, self.shapes[key][0]) if self.can_split_rows(key) else self._whole(key)

    def rows(self, key: str, start: int, stop: int):
        from lib.lora_math import embedding_delta, linear_delta, replace_rows

        if not self.can_split_rows(key):
            return self._whole(key)[start:stop]
        tensor = self.replace[key][start:stop] if key in self.replace else self.base.get_rows(key, start, stop)
        module, parts = self._lora(key)
        if parts is not None and "tokens" in parts:
            tensor = replace_rows(tensor, parts["token_ids"], parts["tokens"], start)
        elif parts is not None:
            scaling = self.lora.scaling(module)
            if "A" in parts:  # ΔW rows a:b = scaling · B[a:b] @ A
                tensor = tensor.float() + linear_delta(parts["A"], parts["B"][start:stop], scaling, False)
            else:  # embedding: ΔW rows a:b = scaling · (B @ A[:, a:b])ᵀ
                tensor = tensor.float() + embedding_delta(parts["emb_A"][:, start:stop], parts["emb_B"], scaling)
        return self._checked(key, tensor)

    def _whole(self, key: str):
        from lib.lora_math import dora_merge, linear_delta

        tensor = self.replace[key] if key in self.replace else self.base.get(key)
        module, parts = self._lora(key)
        if parts is not None:
            delta = linear_delta(parts["A"], parts["B"], self.lora.scaling(module), self.lora.fan_in_fan_out)
            if "magnitude" in parts:
                tensor = dora_merge(tensor, delta, parts["magnitude"], self.lora.fan_in_fan_out)
            else:
                tensor = tensor.float() + delta
        return self._checked(key, tensor)

    def _checked(self, key: str, tensor):
        """Round to the output dtype; a tensor the adapter changed must be finite (the base's own are as given)."""
        import torch

        changed = key in self.replace or self._lora(key)[1] is not None
        if changed and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(f"merged tensor {key} has non-finite values (inf/NaN): the adapter or base is broken")
        return tensor.to(self.dtypes[key])

    def provenance(self, method: str) -> dict:
        return provenance(self.base_dir, self.ckpt, self.adapter_cfg, method, len(self.pairs), len(self.replace))


def write_side_files(source: MergedSource, dest: Path, method: str) -> None:
    """config.json, generation config, tokenizer and merge_info.json of the merged model."""
    (dest / "config.json").write_text(json.dumps(source.config(), indent=2) + "\n")
    copy_side_files(source.base_dir, source.ckpt, dest)
    (dest / "merge_info.json").write_text(json.dumps(source.provenance(method), indent=2) + "\n")


def tokenizer_source(base_dir: Path, ckpt: Path) -> Path:
    """The checkpoint when it carries a tokenizer (with the chat template it was trained with), else the base."""
    return ckpt if (ckpt / "tokenizer_config.json").exists() else base_dir


def check_tokenizer(folder: Path, base_cfg: dict | None = None) -> None:
    """The tokenizer files the merged model gets from `folder` must load: the converter reads them only after
    the whole merge, and a broken one would end it in a traceback. With the base's config.json, the files its
    architecture's converter needs must be there."""
    model = Path(folder) / "tokenizer.model"
    if base_cfg is not None:
        require_sentencepiece_file(folder, base_cfg)
    if model.exists():
        import sentencepiece
        try:
            sentencepiece.SentencePieceProcessor(model_file=str(model))
        except (RuntimeError, OSError) as e:
            raise UserError(f"{model} is not a valid SentencePiece model ({str(e).strip()}): replace it with the "
                            f"model's own, or remove it if tokenizer.json is there") from None
    fast = Path(folder) / "tokenizer.json"
    if fast.exists():
        from tokenizers import Tokenizer
        try:
            Tokenizer.from_file(str(fast))
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad JSON and bad models
            raise UserError(f"{fast} cannot be read by the tokenizers library ({str(e).strip()})") from None
        if not model.exists() and byte_level_with_byte_fallback(json.loads(fast.read_text(encoding="utf-8"))):
            raise UserError(f"{fast} is a byte-level BPE tokenizer (pre_tokenizer ByteLevel) with \"byte_fallback\": "
                            f"true in its \"model\": llama.cpp's converter would write it as a SentencePiece "
                            f"vocabulary that fails every request; set \"byte_fallback\": false there, as in the "
                            f"model's original tokenizer.json")


def require_sentencepiece_file(folder: Path, base_cfg: dict) -> None:
    """One line where the converter for the base's architecture would stop on a missing tokenizer.model."""
    archs = [a for a in base_cfg.get("architectures") or [] if a in SENTENCEPIECE_ONLY]
    if not archs or (Path(folder) / "tokenizer.model").exists():
        return
    if archs[0] in ("Phi3ForCausalLM", "Phi4ForCausalLMV", "PhiMoEForCausalLM"):
        try:
            tok_cfg = json.loads((Path(folder) / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            tok_cfg = {}
        if tok_cfg.get("tokenizer_class") == "GPT2Tokenizer":  # Phi-4: the converter reads tokenizer.json
            return
    raise UserError(f"{Path(folder) / 'tokenizer.model'} is missing: llama.cpp's converter for {archs[0]} reads "
                    f"the SentencePiece model and cannot use tokenizer.json alone; copy tokenizer.model from the "
                    f"original model into {folder}")


def byte_level_with_byte_fallback(tokenizer: dict) -> bool:
    """A BPE whose pre-tokenizer maps bytes to characters (GPT-2's ByteLevel) never needs byte fallback; with it
    on, and a Sequence decoder (as Transformers' GGUF import writes them), llama.cpp's converter takes the model
    for a SentencePiece-style Llama BPE (LlamaHfVocab) and writes an SPM vocabulary (tokenizer.ggml.model llama)
    that llama.cpp then cannot use."""
    model = tokenizer.get("model") or {}

    def byte_level(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(byte_level(v) for v in node.values())
        return isinstance(node, list) and any(byte_level(v) for v in node)

    return (model.get("type") == "BPE" and bool(model.get("byte_fallback")) and byte_level(tokenizer.get("pre_tokenizer"))
            and (tokenizer.get("decoder") or {}).get("type") == "Sequence")


def recorded_base_differs(cfg: dict, base_dir: Path) -> str | None:
    """A warning when adapter_config.json names another base than the one given. Names are compared loosely
    (letters and digits; a hub id matches its download folder; one name inside the other, so Unsloth's
    "unsloth/llama-3-8b-bnb-4bit" matches "Meta-Llama-3-8B"). A shape mismatch is an error elsewhere: this
    catches bases whose shapes happen to fit."""
    recorded = str(cfg.get("base_model_name_or_path") or "").rstrip("/")
    if not recorded:
        return None
    base_dir = Path(base_dir).resolve()
    names = [base_dir.name]
    try:
        names.append(Path(str(json.loads((base_dir / "config.json").read_text()).get("_name_or_path", ""))).name)
    except (OSError, ValueError):
        pass
    wanted = squashed(re.sub(QUANTIZED_SUFFIX, "", Path(recorded).name, flags=re.IGNORECASE))
    for name in filter(None, map(squashed, names)):
        if squashed(recorded) == name or wanted in name or name in wanted:
            return None
    return (f"warning: the adapter was trained on {recorded}, but the base is {base_dir}; if that is not the same "
            f"model, set BASE_MODEL={recorded}")


def copy_side_files(base_dir: Path, ckpt: Path, dest: Path) -> None:
    """generation_config from the base; the tokenizer from tokenizer_source()."""
    if (base_dir / "generation_config.json").exists():
        shutil.copy2(base_dir / "generation_config.json", dest)
    tok_src = tokenizer_source(base_dir, ckpt)
    for name in TOKENIZER_FILES:
        if (tok_src / name).exists():
            shutil.copy2(tok_src / name, dest / name)


def gguf_model_name(base_dir: Path, ckpt: Path, base_cfg: dict) -> str:
    """general.name of the merged GGUF: the base's folder name and the checkpoint's, led by the model type when
    the names do not hold it. llama.cpp keys tokenizer fixes on this name (a model named phi3/phi-3 gets the
    whitespace after its special tokens stripped, as Phi-3's own tokenizer does), so it must name the family."""
    name = f"{Path(base_dir).resolve().name}-{Path(ckpt).name}"
    model_type = str(base_cfg.get("model_type", ""))
    return name if squashed(model_type) in squashed(name) else f"{model_type}-{name}"


def provenance(base_dir: Path, ckpt: Path, cfg: dict, method: str, n_lora, n_replaced) -> dict:
    adapter = next(p for p in (ckpt / "adapter_model.safetensors", ckpt / "adapter_model.bin") if p.exists())
    return {"base": str(base_dir.resolve()), "checkpoint": str(ckpt.resolve()),
            "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest(), "method": method,
            "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "use_rslora": cfg.get("use_rslora", False),
            "use_dora": cfg.get("use_dora", False), "lora_modules": n_lora, "replaced_tensors": n_replaced}
