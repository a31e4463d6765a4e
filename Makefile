# lora-ship: merge a LoRA fine-tune into its Llama-family base, quantize it to GGUF, serve it over HTTP.
# `make` runs everything; `make help` lists the targets and variables. Every variable can be overridden:
#   make BASE_MODEL=meta-llama/Llama-2-7b-hf QUANT=Q4_K_M PORT=9000
SHELL := /bin/bash
.DELETE_ON_ERROR:
.DEFAULT_GOAL := all

# ---- variables (override on the command line) ----
BASE_MODEL       ?= smollm2
CHECKPOINTS_DIR  ?= quantization/checkpoints
CHECKPOINT       ?=
DATASET          ?= data/grimm_stories.jsonl
GUTENBERG_TXT    ?= https://www.gutenberg.org/cache/epub/2591/pg2591.txt
QUANT            ?= q8_0
IMATRIX          ?= auto
CALIBRATION      ?=
MAX_KL           ?= 0.01
MAX_SIZE         ?=
PLAN_COST        ?= kl
MERGE_METHOD     ?= streaming
KEEP_MERGED      ?=
HOST             ?= 127.0.0.1
PORT             ?= 8080
API_KEY          ?=
ADMIN_KEY        ?=
KEYS_FILE        ?= $(OUT)/keys.txt
TENANT           ?=
ALLOW_NO_KEY     ?=
OPEN             ?=
ENGINE           ?= auto
GPU_LAYERS       ?= auto
CTX_SIZE         ?= auto
PARALLEL         ?= auto
MAX_TOKENS       ?= 1024
BACKEND_SAMPLING ?= auto
CACHE_RAM        ?= auto
SERVER_ARGS      ?=
REPLICAS         ?= auto
REMOTE_REPLICAS  ?=
BALANCER         ?= auto
PROMPT           ?= Tell me a fairy tale
OUT              ?= out
VENV             ?= .venv
PYTHON           ?= python3
TORCH_SPEC       ?= torch==2.13.0
LLAMA_CPP_COMMIT ?= 0c1e57098
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
LLAMA_CPP_PYTHON_SHA256 ?= 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
LLAMA_CPP_REPO   ?= https://github.com/ggml-org/llama.cpp
LLAMA_BACKEND    ?= auto
LLAMAFILE_VERSION ?= 0.9.3
LLAMAFILE_SHA256 ?=
TRAIN_STEPS      ?=
RECIPE           ?= auto
NPROC            ?= 1
TRAIN_ARGS       ?=
RUN_NAME         ?= grimm-lora
EVAL_EVERY       ?= 10
SAVE_EVERY       ?= 10
GENERATE_ARGS    ?=
EVAL_ARGS        ?=
BENCH_MODEL      ?= default
BENCH_ADAPTERS   ?=
BENCH_TENANTS    ?=
PYTEST_ARGS      ?=
PIPELINE_JOBS    ?= 3

HELP_VARS := BASE_MODEL BASE_NAME CHECKPOINTS_DIR CHECKPOINT DATASET GUTENBERG_TXT QUANT IMATRIX CALIBRATION MAX_KL MAX_SIZE PLAN_COST MERGE_METHOD HOST PORT API_KEY ADMIN_KEY KEYS_FILE TENANT \
  ALLOW_NO_KEY OPEN ENGINE GPU_LAYERS CTX_SIZE PARALLEL MAX_TOKENS BACKEND_SAMPLING CACHE_RAM SERVER_ARGS REPLICAS REMOTE_REPLICAS BALANCER \
  PROMPT OUT VENV PYTHON TORCH_SPEC \
  LLAMA_CPP_COMMIT LLAMA_CPP_REPO LLAMA_CPP_PYTHON LLAMA_CPP_PYTHON_SHA256 LLAMA_BACKEND LLAMAFILE_VERSION LLAMAFILE_SHA256 \
  PIPELINE_JOBS TRAIN_STEPS RECIPE NPROC TRAIN_ARGS RUN_NAME EVAL_EVERY SAVE_EVERY LOAD MODEL GENERATE_ARGS EVAL_ARGS MODELS \
  COMPARE_ARGS KEEP_MERGED BENCH_MODEL BENCH_ADAPTERS BENCH_TENANTS PYTEST_ARGS

# Plain `make` (and `make test`) runs independent stages at once: the llama.cpp build (which needs no Python
# packages) goes on beside the install and the base model, so the build is most of the wait.
# Other targets run one step at a time unless given -j. After an error, make still waits for the jobs already running.
# The input checks still come first: in `make` the quick one (system Python, a second) before the install, the
# llama.cpp source and build start, the full one (the adapter's fit, the tokenizer files) before the base.
ifeq ($(filter-out all test,$(MAKECMDGOALS)),)
  MAKEFLAGS += --jobs=$(PIPELINE_JOBS)
endif
ifeq ($(MAKECMDGOALS),test)
  MAKEFLAGS += --output-sync=line
endif
# Goals that end in a server: their quick check also makes sure the port is free (or held by our own server),
# and it runs before anything long for them too, so a busy port is found before the merge replaces a file.
# (serve-adapters serves every checkpoint, so its quick check is the port alone: the checks of one checkpoint
# do not apply.)
SERVE_GOALS := all serve serve-bg serve-adapters serve-replica
ifneq ($(if $(MAKECMDGOALS),$(filter $(SERVE_GOALS),$(MAKECMDGOALS)),all),)
  AFTER_QUICK_CHECK := quick-check
  PORT_CHECK_ARGS = --port-free $(HOST):$(PORT) --pid-file $(PID_FILE)
  ifeq ($(filter serve-adapters,$(MAKECMDGOALS)),)
    AFTER_CHECK := check
  else
    PORT_CHECK_ARGS += --port-only
  endif
endif
# The variables given on the command line that say which server (OUT: its pid file; HOST, PORT: where), for
# the hints printed by make's steps ('make stop OUT=out-b'), so that the command shown is the one that works.
HINT_VARS := $(strip $(foreach v,OUT HOST PORT,$(if $(filter command line,$(origin $(v))),$(v)=$($(v)))))

# ---- stage timing: a line when a stage starts, its time when it ends, a summary at the end of `make` ----
RUN_START := $(shell date +%s)
STAGE_TIMES := $(OUT)/logs/stage-times.tsv
stage-start = @mkdir -p $(OUT)/logs && date +%s > $(OUT)/logs/.stage-$(1) && echo ">>> $(1): $(2)"
stage-end = @s=$$(( $$(date +%s) - $$(cat $(OUT)/logs/.stage-$(1)) )); rm -f $(OUT)/logs/.stage-$(1); \
  printf '%s\t%s\t%s\n' $(RUN_START) $(1) $$s >> $(STAGE_TIMES); \
  printf '>>> %s: done in %dm%02ds\n' $(1) $$((s / 60)) $$((s % 60))
stage-summary = @touch $(STAGE_TIMES); awk -F'\t' -v run=$(RUN_START) -v now=$$(date +%s) \
  'function t(s) { return sprintf("%dm%02ds", s / 60, s % 60) } \
   $$1 == run { n++; printf "%s    %-16s %s\n", (n == 1 ? ">>> stage times:\n" : ""), $$2, t($$3) } \
   END { printf ">>> %s in %s%s\n", (n ? "make" : "nothing to redo: make"), t(now - run), \
         (n > 1 ? " (some stages ran side by side)" : "") }' $(STAGE_TIMES)

# ---- derived paths ----
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed-stamp
LLAMA_CPP := vendor/llama.cpp
LLAMA_BIN := $(LLAMA_CPP)/build/bin
LLAMA_SRC := $(LLAMA_CPP)/.lora-ship-source
LLAMAFILE := vendor/llamafile/bin/llamafile
MERGED    := $(OUT)/merged
GGUF      := $(OUT)/model.$(QUANT).gguf
PID_FILE  := $(OUT)/server.pid
ADAPTERS_DIR := $(OUT)/adapters
BASE_GGUF := $(OUT)/base.$(QUANT).gguf
DEMO_CKPT := quantization/demo-checkpoint

ifeq ($(BASE_MODEL),smollm2)
  BASE_DIR := $(OUT)/base/smollm2
else ifneq ($(wildcard $(BASE_MODEL)/config.json),)
  BASE_DIR := $(BASE_MODEL)
else
  BASE_DIR := $(OUT)/base/$(subst /,--,$(BASE_MODEL))
endif

# The user's checkpoints; with none and the embedded base, the shipped demo adapter (a 20-step LoRA on the Grimm
# tales, made by `make train`: quantization/demo-checkpoint/README.md), where it is there (else the check's error).
USER_CHECKPOINTS := $(filter-out %README.md,$(wildcard $(CHECKPOINTS_DIR)/*))
CHECKPOINT_FILES := $(wildcard $(CHECKPOINTS_DIR)/*/adapter_* $(CHECKPOINTS_DIR)/*/*/adapter_* \
                      $(CHECKPOINT)/adapter_* $(CHECKPOINTS_DIR)/$(CHECKPOINT)/adapter_*)
ifeq ($(strip $(USER_CHECKPOINTS)$(CHECKPOINT)),)
  ifeq ($(BASE_MODEL),smollm2)
    ifneq ($(wildcard $(DEMO_CKPT)/adapter_config.json),)
      CHECKPOINT_FILES := $(DEMO_CKPT)/adapter_config.json
      FALLBACK_ARG := --fallback $(DEMO_CKPT)
    endif
  endif
endif
MERGE_INPUTS := $(BASE_DIR) $(CHECKPOINT) $(MERGE_METHOD) $(sort $(USER_CHECKPOINTS)) $(FALLBACK_ARG)

.PHONY: all help install check vendor llamafile base merge quantize serve serve-bg stop status serve-replica chat train test clean \
        package generate compare key keys-reload usage bench-merge bench-train bench-serve bench-affinity test-serve eval data adapters serve-adapters \
        clean-vendor screenshot quick-check test-without-llama-cpp test-llama-cpp test-shared-reset FORCE run-install-python-dependencies run-download-llamafile run-clone-repositories \
        run-merge-models run-quantize-llama-model

all: install check vendor llamafile base merge quantize serve-bg ## the whole pipeline: install, check inputs, build, merge, quantize, serve in the background; stage times at the end
	$(call stage-summary)

help: ## list targets and variables
	@echo "Targets:"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-34s %s\n", $$1, $$2}'
	@echo "Variables (current value):"
	@$(foreach v,$(HELP_VARS),printf "  %-18s %s\n" '$(v)' '$($(v))';)

export PROMPT API_KEY ADMIN_KEY

# ---- install ----
install: $(STAMP) ## create .venv and install requirements.local.txt (torch pinned first)
run-install-python-dependencies: install ## alias of install (seed name)

# torch first and pinned: an unpinned torch (or one pulled in by another package) is a multi-GB CUDA build
$(STAMP): requirements.local.txt | $(AFTER_QUICK_CHECK)
	$(call stage-start,install,Python packages into $(VENV) (torch first))
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --disable-pip-version-check -q "$(TORCH_SPEC)"
	@$(PY) -m pip install --disable-pip-version-check -q -r requirements.local.txt
	@# llama-cpp-python's Python side only (LLAMA_BUILD=OFF): it loads vendor/llama.cpp's own libllama.so
	@# (LLAMA_CPP_LIB_PATH), the same commit its sdist vendors, instead of compiling llama.cpp a second time
	@printf '%s --hash=sha256:%s\n' "$(LLAMA_CPP_PYTHON)" "$(LLAMA_CPP_PYTHON_SHA256)" > $(VENV)/llama-cpp-python.txt
	@CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PY) -m pip install --disable-pip-version-check -q --no-deps --require-hashes \
	  -r $(VENV)/llama-cpp-python.txt
	$(call stage-end,install)
	@touch $@

# A stamp of make variables for file targets to depend on (FORCE runs it every time): $@ is rewritten, and so
# looks newer, only when the text changes.
write-if-changed = @mkdir -p $(@D); echo '$(1)' | cmp -s - $@ || echo '$(1)' > $@

# ---- inputs ----
# QUANT, BASE_MODEL, the checkpoint and its fit to the base, checked in seconds before the long steps: in `make`
# once the venv is in (the quick part, which needs none, ran first); the base and the merge wait for it
QUANT_CHECK_ARGS = --imatrix "$(IMATRIX)" $(if $(CALIBRATION),--calibration "$(CALIBRATION)") --plan-cost "$(PLAN_COST)"
check: | $(STAMP) ## check QUANT, BASE_MODEL, CHECKPOINT, the adapter's config, its fit to the base and the tokenizer files
	@$(PY) scripts/check_inputs.py --quant "$(QUANT)" --base-model "$(BASE_MODEL)" $(MERGE_ARGS) $(QUANT_CHECK_ARGS)
quick-check:
	@$(PYTHON) scripts/check_inputs.py --quick --quant "$(QUANT)" --base-model "$(BASE_MODEL)" $(MERGE_ARGS) $(QUANT_CHECK_ARGS) \
	  $(PORT_CHECK_ARGS)

# ---- vendor tools ----
vendor: $(LLAMA_BIN)/llama-server ## fetch llama.cpp at LLAMA_CPP_COMMIT, apply patches/llama.cpp, build server, quantize, imatrix, perplexity, batched-bench; clone llamafile's source
	@$(PYTHON) scripts/fetch_llamafile.py --version $(LLAMAFILE_VERSION) --sha256 "$(LLAMAFILE_SHA256)" --source-only $(LLAMAFILE_ONCE)
run-clone-repositories: vendor ## alias of vendor (seed name)

$(LLAMA_SRC): $(wildcard patches/llama.cpp/*.patch) | $(AFTER_QUICK_CHECK)
	$(call stage-start,llama.cpp-source,llama.cpp $(LLAMA_CPP_COMMIT) with patches/llama.cpp)
	@$(PYTHON) scripts/vendor_llama_cpp.py fetch --commit $(LLAMA_CPP_COMMIT) --repo $(LLAMA_CPP_REPO) --log $(OUT)/logs/llama.cpp.log
	$(call stage-end,llama.cpp-source)

# Built again when the source, the build script (its flags) or LLAMA_BACKEND change; the script reuses a cached
# build whose key (commit, patch set, backend, flags) is unchanged, so that takes a second. touch: the reused
# binary is older than what changed.
$(LLAMA_BIN)/llama-server: $(LLAMA_SRC) scripts/vendor_llama_cpp.py vendor/.llama-build-inputs | $(AFTER_QUICK_CHECK)
	$(call stage-start,llama.cpp-build,llama-server and tools (a cached build is reused))
	@$(PYTHON) scripts/vendor_llama_cpp.py build --backend $(LLAMA_BACKEND) --log $(OUT)/logs/llama.cpp.log
	$(call stage-end,llama.cpp-build)
	@touch $@

vendor/.llama-build-inputs: FORCE | $(AFTER_QUICK_CHECK)
	$(call write-if-changed,backend=$(LLAMA_BACKEND))

# llamafile is optional (llama-server serves with the same API): inside `make` it says what happened in one line,
# once (a marker in vendor/llamafile remembers); named as a goal it tries again and always says.
LLAMAFILE_ONCE := $(if $(filter llamafile run-download-llamafile vendor run-clone-repositories,$(MAKECMDGOALS)),,--once)
llamafile: | $(AFTER_QUICK_CHECK) ## download the llamafile binary and install it if its sha256 is LLAMAFILE_SHA256 (none is pinned: say which you checked); without it llama-server serves
	@$(PYTHON) scripts/fetch_llamafile.py --version $(LLAMAFILE_VERSION) --sha256 "$(LLAMAFILE_SHA256)" --binary-only $(LLAMAFILE_ONCE)
run-download-llamafile: llamafile ## alias of llamafile (seed name)

# ---- model ----
base: $(BASE_DIR)/config.json ## the base model as a Hugging Face folder (BASE_MODEL: smollm2, a folder, or a hub id)

$(BASE_DIR)/config.json: | $(STAMP) $(AFTER_CHECK)
	$(call stage-start,base,$(BASE_MODEL) as a Hugging Face folder)
	@$(PY) scripts/prepare_base.py --base-model "$(BASE_MODEL)" --out $(BASE_DIR) --cache $(OUT)/cache
	$(call stage-end,base)

data: | $(STAMP) ## build out/data/grimm_stories.jsonl from Gutenberg #2591 (sha256-checked; GUTENBERG_TXT=local copy offline)
	$(PY) scripts/make_data.py --source "$(GUTENBERG_TXT)" --out $(OUT)/data/grimm_stories.jsonl
	@echo "use it with: make train DATASET=$(OUT)/data/grimm_stories.jsonl"

# NPROC > 1: data-parallel over NPROC GPUs with torchrun (DDP); the global batch stays the recipe's.
TRAIN_LAUNCH = $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC),$(PY))
train: $(BASE_DIR)/config.json | $(STAMP) ## fine-tune a LoRA on DATASET into CHECKPOINTS_DIR/RUN_NAME (RECIPE: seed QLoRA on a GPU, cpu otherwise, fast; NPROC GPUs; an interrupted run resumes)
	$(TRAIN_LAUNCH) scripts/train_lora.py --base $(BASE_DIR) --dataset $(DATASET) --out $(CHECKPOINTS_DIR)/$(RUN_NAME) \
	  --recipe $(RECIPE) $(if $(TRAIN_STEPS),--steps $(TRAIN_STEPS)) --eval-every $(EVAL_EVERY) --save-every $(SAVE_EVERY) $(TRAIN_ARGS)

bench-train: $(BASE_DIR)/config.json | $(STAMP) ## tokens/s, TFLOP/s, peak GPU memory, held-out loss: the seed's QLoRA vs ours, lever by lever, and Unsloth/Liger where installed; BENCH_MODEL=8b-random
	$(PY) scripts/bench/train.py --base $(BASE_DIR) --dataset $(DATASET) --model $(BENCH_MODEL)

# written only once the inputs passed the check: a refused run leaves it as it was, so the next good run does not
# redo the merge
$(OUT)/.merge-inputs: FORCE | check
	$(call write-if-changed,$(MERGE_INPUTS))

# By default the merge goes straight into the GGUF (merge_gguf.py: no merged copy on disk). KEEP_MERGED=1, or
# MERGE_METHOD=peft, writes the merged Hugging Face model to $(MERGED) first and converts that instead.
CONVERTER_QUANTS := q8_0 f16 bf16 f32 Q8_0 F16 BF16 F32
# converter-only types need just the llama.cpp source; the others need the built llama-quantize
CONVERT_TOOLS := $(if $(filter $(CONVERTER_QUANTS),$(QUANT)),$(LLAMA_SRC),$(LLAMA_BIN)/llama-server)
MERGE_ARGS = --base $(BASE_DIR) --checkpoints-dir $(CHECKPOINTS_DIR) $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") \
  $(FALLBACK_ARG)
# k-quant and IQ types: an importance matrix over the calibration text (lib/imatrix.py), cached in $(OUT)/imatrix;
# DATASET calibrates where it was given (else the checkpoint's recorded training data, else a general text); a
# CALIBRATION file that is not there is make check's one line, not make's "No rule" (hence $(wildcard) below)
DATASET_GIVEN := $(filter command line environment override,$(origin DATASET))
# QUANT=auto: the smallest candidate within MAX_KL on held-out text (or the closest within MAX_SIZE)
# QUANT=Q4_K_M+ (and auto's plans): PLAN_COST=kl measures each group of tensors' KL; weights: far faster, blinder
IMATRIX_ARGS = --imatrix $(IMATRIX) $(if $(CALIBRATION),--calibration "$(CALIBRATION)") \
  $(if $(DATASET_GIVEN),--dataset "$(DATASET)") --imatrix-cache $(OUT)/imatrix --plan-cost $(PLAN_COST) \
  $(if $(filter auto,$(QUANT)),--max-kl $(MAX_KL) $(if $(MAX_SIZE),--max-size $(MAX_SIZE)))
ifeq ($(filter $(CONVERTER_QUANTS),$(QUANT)),)
  MERGE_INPUTS += imatrix=$(IMATRIX) $(CALIBRATION) $(if $(DATASET_GIVEN),$(DATASET)) \
    $(if $(filter auto %+,$(QUANT)),plan=$(PLAN_COST)) $(if $(filter auto,$(QUANT)),$(MAX_KL) $(MAX_SIZE))
endif

$(MERGED)/config.json: $(BASE_DIR)/config.json $(CHECKPOINT_FILES) $(OUT)/.merge-inputs | $(STAMP) check
	$(call stage-start,merge,the adapter into $(MERGED))
	@$(PY) scripts/merge_lora.py $(MERGE_ARGS) --method $(MERGE_METHOD) --out $(MERGED)
	$(call stage-end,merge)

ifneq ($(KEEP_MERGED)$(filter peft,$(MERGE_METHOD)),)
merge: $(MERGED)/config.json ## merge the checkpoint (CHECKPOINTS_DIR, or CHECKPOINT=) into the base: straight into the GGUF; KEEP_MERGED=1 also keeps an HF copy in out/merged
$(GGUF): $(MERGED)/config.json $(wildcard $(CALIBRATION)) | $(CONVERT_TOOLS) $(STAMP) check
	$(call stage-start,quantize,$(MERGED) to $@)
	@$(PY) scripts/convert_gguf.py --model $(MERGED) --quant $(QUANT) --out $@ --llama-cpp $(LLAMA_CPP) \
	  --log $(OUT)/logs/convert.log $(IMATRIX_ARGS)
	$(call stage-end,quantize)
else
merge: $(GGUF)
$(GGUF): $(BASE_DIR)/config.json $(CHECKPOINT_FILES) $(wildcard $(CALIBRATION)) $(OUT)/.merge-inputs | $(CONVERT_TOOLS) $(STAMP) check
	$(call stage-start,merge,the adapter straight into $@)
	@$(PY) scripts/merge_gguf.py $(MERGE_ARGS) --quant $(QUANT) --out $@ --llama-cpp $(LLAMA_CPP) \
	  --log $(OUT)/logs/convert.log $(IMATRIX_ARGS)
	$(call stage-end,merge)
endif
run-merge-models: merge ## alias of merge (seed name)

quantize: $(GGUF) ## the GGUF of the merged model (QUANT: q8_0, f16, bf16, Q4_K_M, ...; k-quant/IQ types with an importance matrix over the fine-tune's data, IMATRIX=off: none; Q4_K_M+: per-tensor plan; auto: smallest within MAX_KL)
run-quantize-llama-model: quantize ## alias of quantize (seed name)

# ---- serving ----
# how the engine runs (shared with bench-serve, which starts its own server); then where this one listens
ENGINE_ARGS = --engine $(ENGINE) --gpu-layers $(GPU_LAYERS) --ctx-size $(CTX_SIZE) --parallel $(PARALLEL) --max-tokens $(MAX_TOKENS) \
  --backend-sampling $(BACKEND_SAMPLING) --cache-ram $(CACHE_RAM) --llamafile $(LLAMAFILE) --llama-server $(LLAMA_BIN)/llama-server $(if $(SERVER_ARGS),--extra-args='$(SERVER_ARGS)')
# KEYS_FILE is used once it exists (`make key` makes the default one); one named on the command line must exist
KEYS_ARG = $(if $(or $(wildcard $(KEYS_FILE)),$(filter-out $(OUT)/keys.txt,$(KEYS_FILE))),--keys-file $(KEYS_FILE))
# REPLICAS engines behind HAProxy (BALANCER) where there is more than one, or REMOTE_REPLICAS
REPLICA_ARGS = --replicas $(REPLICAS) --balancer $(BALANCER) $(if $(REMOTE_REPLICAS),--remote-replicas '$(REMOTE_REPLICAS)')
LISTEN_ARGS = --host $(HOST) --port $(PORT) --pid-file $(PID_FILE) --log $(OUT)/logs/server.log --make-vars "$(HINT_VARS)" \
  $(KEYS_ARG) --usage-log $(OUT)/logs/usage.jsonl $(if $(ALLOW_NO_KEY),--allow-no-key) $(if $(OPEN),--open) $(ENGINE_ARGS) \
  $(REPLICA_ARGS)
SERVE_ARGS = --model $(GGUF) $(LISTEN_ARGS)

serve: $(GGUF) | $(LLAMA_BIN)/llama-server ## serve the GGUF on HOST:PORT in the foreground (Ctrl-C stops)
	$(PYTHON) scripts/serve.py start $(SERVE_ARGS)

serve-bg: $(GGUF) | $(LLAMA_BIN)/llama-server ## serve in the background (pid in out/server.pid); `make stop` ends it
	$(call stage-start,serve,$(GGUF) on $(HOST):$(PORT) in the background)
	@$(PYTHON) scripts/serve.py start --background $(SERVE_ARGS)
	$(call stage-end,serve)

# ---- many fine-tunes, one base: adapters applied unmerged, chosen per request by name ----
# The base's served name: its folder's (smollm2, or meta-llama--Llama-2-7b-hf for a hub id)
BASE_NAME ?= $(notdir $(BASE_DIR))
adapters: $(BASE_GGUF) $(CHECKPOINT_FILES) | $(LLAMA_SRC) $(STAMP) ## every checkpoint in CHECKPOINTS_DIR as out/adapters/NAME.gguf (applied unmerged; what cannot be is named), the base once as out/base.QUANT.gguf
	$(PY) scripts/export_adapters.py --base $(BASE_DIR) --checkpoints-dir $(CHECKPOINTS_DIR) \
	  $(if $(CHECKPOINT),--checkpoint "$(CHECKPOINT)") $(FALLBACK_ARG) --out-dir $(ADAPTERS_DIR) --base-name $(BASE_NAME) \
	  --llama-cpp $(LLAMA_CPP) --log $(OUT)/logs/convert.log

$(BASE_GGUF): $(BASE_DIR)/config.json | $(CONVERT_TOOLS) $(STAMP)
	$(PY) scripts/convert_gguf.py --model $(BASE_DIR) --quant $(QUANT) --out $@ --llama-cpp $(LLAMA_CPP) \
	  --log $(OUT)/logs/convert.log

serve-adapters: adapters | $(LLAMA_BIN)/llama-server ## one server in the background: the base once, every adapter chosen by "model": NAME (the base by BASE_NAME); run again to load new ones; `make stop` ends it
	$(PYTHON) scripts/serve.py start --background --model $(BASE_GGUF) --adapters $(ADAPTERS_DIR) --alias $(BASE_NAME) \
	  $(LISTEN_ARGS)

# The README's picture of the chat page: tests/test_webui.py's compare test on the base and the adapters of `make
# adapters` (SmolLM2 and the demo LoRA by default) instead of its tiny random models, copied to docs/img/
screenshot: adapters | $(LLAMA_BIN)/llama-server $(STAMP) ## docs/img/compare.png: the chat page comparing the base with its first adapter, taken in headless Chromium by tests/test_webui.py
	LORA_SHIP_WEBUI_BASE=$(BASE_GGUF) LORA_SHIP_WEBUI_ADAPTERS=$(ADAPTERS_DIR) LORA_SHIP_WEBUI_ALIAS=$(BASE_NAME) \
	  LORA_SHIP_SCREENSHOTS=$(OUT)/webui $(PY) -m pytest tests/test_webui.py -k compare -q $(PYTEST_ARGS)
	@mkdir -p docs/img && cp $(OUT)/webui/compare.png docs/img/compare.png && echo "wrote docs/img/compare.png"

package: $(GGUF) | llamafile ## one self-contained executable: the llamafile binary + the GGUF + default args ($(OUT)/model.QUANT.llamafile; run it with --server)
	$(PYTHON) scripts/package_llamafile.py --model $(GGUF) --out $(GGUF:.gguf=.llamafile) --llamafile $(LLAMAFILE) \
	  --host $(HOST) --port $(PORT)

key: ## a new key for TENANT that may use MODELS (names or globs: MODELS='acme-*'), printed once; its sha256 appended to KEYS_FILE
	@$(if $(filter command line environment,$(origin MODELS)),,echo "make key needs MODELS='acme-*' (the models this key may use)"; exit 1)
	@$(PYTHON) scripts/keys.py add --file $(KEYS_FILE) --tenant "$(TENANT)" --models "$(MODELS)"

keys-reload: ## have the running server read KEYS_FILE now (it also does by itself when the file changes)
	@$(PYTHON) scripts/keys.py reload --url http://$(HOST):$(PORT) --admin-key-file $(PID_FILE:.pid=.admin.key)

usage: ## requests, tokens and times per tenant and model, from the server's usage log ($(OUT)/logs/usage.jsonl)
	@$(PYTHON) scripts/usage.py --log $(OUT)/logs/usage.jsonl

stop: ## stop the background server of this OUT (or its replicas and their balancer)
	@$(PYTHON) scripts/serve.py stop --pid-file $(PID_FILE) --make-vars "$(HINT_VARS)"

status: ## what serves: each replica's state, model, uptime, requests served (HAProxy's counts), or the one server
	@$(PYTHON) scripts/serve.py status --pid-file $(PID_FILE) --make-vars "$(HINT_VARS)"

serve-replica: $(GGUF) | $(LLAMA_BIN)/llama-server ## one engine in the background for a balancer on another machine (REMOTE_REPLICAS there): HOST=its address PORT= API_KEY=
	$(PYTHON) scripts/serve.py start --background --model $(GGUF) --host $(HOST) --port $(PORT) --pid-file $(PID_FILE) \
	  --log $(OUT)/logs/server.log --make-vars "$(HINT_VARS)" $(if $(ALLOW_NO_KEY),--allow-no-key) $(ENGINE_ARGS) \
	  --replicas 1 --balancer none

chat: ## send PROMPT to the running server and stream the answer
	@$(PYTHON) scripts/chat.py --url http://$(HOST):$(PORT)

# ---- generation and benchmarks ----
LOAD  ?= 16bit
MODEL ?= $(MERGED)
generate: $(if $(filter $(MERGED),$(MODEL)),$(MERGED)/config.json) | $(STAMP) ## generate from MODEL (default: the merged model) with Transformers, LOAD=nf4|int8|16bit, or a .gguf with llama-cpp-python; streams
	$(PY) scripts/generate.py --model $(MODEL) --load $(LOAD) --prompt "$$PROMPT" $(GENERATE_ARGS)

MODELS ?= $(BASE_DIR) $(BASE_DIR):nf4 $(GGUF)
COMPARE_ARGS ?= --greedy --max-new-tokens 64
compare: | $(STAMP) ## the same PROMPT through each of MODELS (folders or .gguf, :nf4/:int8 for a load mode): load time, tokens/s, memory
	$(PY) scripts/compare.py $(MODELS) --prompt "$$PROMPT" -- $(COMPARE_ARGS)

bench-serve: $(GGUF) $(if $(BENCH_ADAPTERS),adapters) | $(LLAMA_BIN)/llama-server $(STAMP) ## served tokens/s, time to first token, errors at 1/8/32 clients vs the engine's own batched numbers (own server on port 8089); REPLICAS=N: the engine alone vs HAProxy with 1 and N replicas at 8/32/128 clients; BENCH_ADAPTERS=1: the merged model vs its adapter served unmerged, alone and among the others; BENCH_TENANTS=1: keys per tenant and the usage log vs one API key (with BENCH_ADAPTERS=1: both serving the adapters)
	$(PY) scripts/bench/serve.py --llama-bin $(LLAMA_BIN) --serve-args "$(ENGINE_ARGS)" --replicas $(REPLICAS) $(if $(BENCH_TENANTS),--tenants) \
	  $(if $(BENCH_ADAPTERS),--model $(BASE_GGUF) --adapters $(ADAPTERS_DIR) --merged $(GGUF) \
	    $(if $(CHECKPOINT),--first $(notdir $(CHECKPOINT))),--model $(GGUF))

bench-affinity: $(GGUF) | $(LLAMA_BIN)/llama-server $(STAMP) ## time to first token of 10-turn conversations through HAProxy, with and without prompt-cache affinity (own replicas on port 8089; REPLICAS, 2 if auto gives 1)
	$(PY) scripts/bench/affinity.py --model $(GGUF) --replicas $(if $(filter auto 1,$(REPLICAS)),2,$(REPLICAS)) \
	  --serve-args "$(ENGINE_ARGS)"

bench-merge: $(BASE_DIR)/config.json $(CHECKPOINT_FILES) | $(LLAMA_SRC) $(STAMP) ## time + peak RSS: the seed's PEFT merge + convert vs ours; BENCH_MODEL=8b-random for a random 8B
	$(PY) scripts/bench/merge.py $(MERGE_ARGS) --model $(BENCH_MODEL) --quant $(QUANT) --workdir $(OUT)/bench-merge

eval: $(BASE_DIR)/config.json $(CHECKPOINT_FILES) | $(LLAMA_BIN)/llama-server $(STAMP) ## quality report on held-out tales: perplexity + KL of base, unmerged, merged, nf4, int8, GGUF f16/q8_0/Q4_K_M (out/eval/; EVAL_ARGS='--max-tokens N --quants Q4_K_M,Q4_K_M:imatrix,Q4_K_M+,...')
	$(PY) scripts/eval_quality.py $(MERGE_ARGS) --dataset $(DATASET) --out $(OUT)/eval --llama-cpp $(LLAMA_CPP) $(EVAL_ARGS)

# ---- checks and housekeeping ----
# Two pytest runs side by side (each in its own temporary folder; make prints their output line by line): the
# tests that need no llama.cpp build (some need its source) start while it builds, the rest (marked llama_cpp in
# tests/) once it is there.
# tests/ fixtures that both runs need are built once, by the first run to ask, in TEST_SHARED (emptied first).
# The first run is niced: the build and then the second run are the longer path, so they get the cores first
# and the first run fills the gaps they leave.
TEST_SHARED := $(abspath $(OUT))/pytest/shared
test: test-without-llama-cpp test-llama-cpp ## run the test suite (tests/): what needs no llama.cpp build runs while it builds
test-without-llama-cpp: $(STAMP) $(LLAMA_SRC) | test-shared-reset
	LORA_SHIP_TEST_SHARED=$(TEST_SHARED) nice -n 10 $(PY) -m pytest tests -m "not llama_cpp" \
	  --basetemp=$(OUT)/pytest/without-llama-cpp $(PYTEST_ARGS)
test-llama-cpp: $(STAMP) $(LLAMA_BIN)/llama-server | test-shared-reset
	LORA_SHIP_TEST_SHARED=$(TEST_SHARED) $(PY) -m pytest tests -m llama_cpp --basetemp=$(OUT)/pytest/llama-cpp \
	  $(PYTEST_ARGS)
test-shared-reset:
	@rm -rf $(TEST_SHARED) && mkdir -p $(TEST_SHARED)

test-serve: $(GGUF) | $(LLAMA_BIN)/llama-server $(STAMP) ## load and fault suite against the GGUF: 32 concurrent clients, bad requests, disconnects, restarts (loopback)
	LORA_SHIP_GGUF=$(GGUF) $(PY) -m pytest tests/test_serve_faults.py $(PYTEST_ARGS)

clean: stop ## remove out/ (models, GGUF files, logs); keeps vendor/ and your checkpoints
	rm -rf $(OUT)

clean-vendor: ## remove vendor/ (the llama.cpp build cache in ~/.cache/lora-ship stays)
	rm -rf vendor

FORCE:
