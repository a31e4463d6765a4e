"""Shared library of the pipeline scripts (scripts/*.py, the stages `make` runs), the benchmarks (scripts/bench/)
and the tools (scripts/tools/); nothing here is run on its own.

common       one-line errors, atomic outputs, disk checks, running a tool with its output logged, BASE_MODEL
checkpoints  finding and reading the adapter checkpoint
tensor_io    reading base weights lazily (safetensors, .bin shards) and writing safetensors shards
lora_math    PEFT's merge arithmetic: LoRA deltas, DoRA, replaced rows
merge        the merged model one tensor at a time (MergedSource), what both writers read from
quants       the GGUF types QUANT can name
imatrix      importance matrices for llama-quantize: the calibration text, llama-imatrix, its cache
quant_plan   per-tensor quantization plans (QUANT=Q4_K_M+): each tensor's error per type, a byte budget spent greedily
quant_auto   QUANT=auto: the smallest candidate within MAX_KL on held-out text (or the lowest KL within MAX_SIZE)
loading      loading a model to generate or score with (Transformers + BitsAndBytes, llama-cpp-python)
tales        the Grimm tales dataset: reading and the held-out split
keys         a shared server's keys: the keys file's format, key hashes, new keys, the admin key file
usage        the usage log of a shared server (out/logs/usage.jsonl) summed per tenant and model
"""
