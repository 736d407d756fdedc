# make train | quickstart | test | lint | format | demo | bench | bench-quick | gpu-check | clean       (MODEL=, DATA=, ARGS= override)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODEL  ?= Qwen/Qwen2.5-0.5B-Instruct
DATA   ?= data/chinese_med.json
OUT    ?= out
ARGS   ?=
# Which torch to install into a new .venv (README: "Which torch"). Given neither TORCH_SPEC nor
# TORCH_INDEX, the build follows the machine: with an NVIDIA GPU visible (nvidia-smi lists one)
# PyPI's default build, the CUDA one (~5.8 GB); without, the CPU build from PyTorch's CPU index
# (under 1 GB), and make says which. Either variable, set on the command line or in the
# environment (even empty: TORCH_INDEX= means PyPI's default), overrides the choice and installs
# exactly `pip install "$TORCH_SPEC" [--index-url $TORCH_INDEX]`; CI sets TORCH_SPEC=torch==2.13.0
# and gets that from the index it is given.
TORCH_DEFAULT_SPEC := torch>=2.4
TORCH_CPU_INDEX    := https://download.pytorch.org/whl/cpu
ifeq ($(origin TORCH_SPEC)$(origin TORCH_INDEX),undefinedundefined)
TORCH_INSTALL = if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then \
		echo "torch: an NVIDIA GPU is visible, installing the CUDA build (PyPI's default; TORCH_INDEX=URL chooses another)"; \
		$(BIN)/python -m pip install -q "$(TORCH_DEFAULT_SPEC)"; \
	else \
		echo "torch: no NVIDIA GPU visible, installing the CPU build from $(TORCH_CPU_INDEX) (TORCH_INDEX= installs PyPI's default CUDA build)"; \
		$(BIN)/python -m pip install -q "$(TORCH_DEFAULT_SPEC)" --index-url $(TORCH_CPU_INDEX); \
	fi
else
TORCH_SPEC ?= $(TORCH_DEFAULT_SPEC)
TORCH_INSTALL = $(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
endif

RUNTIME := $(VENV)/.runtime-installed
DEV     := $(VENV)/.dev-installed
EVAL    := $(VENV)/.eval-installed
DEMO_MODEL := .cache/demo-model

.PHONY: train quickstart test lint format demo bench bench-quick gpu-check clean

# Setup is idempotent: the stamp files make a second run install nothing.
$(RUNTIME): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || { $(TORCH_INSTALL); }
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

$(EVAL): $(RUNTIME) requirements-eval.txt
	$(BIN)/python -m pip install -q -r requirements-eval.txt
	touch $@

$(DEV): $(RUNTIME) requirements-dev.txt requirements-eval.txt
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	touch $@

train: $(RUNTIME)
	$(BIN)/python train.py --model $(MODEL) --data $(DATA) --output $(OUT) $(ARGS)
	@echo "adapter: $(OUT)/   try it:  $(BIN)/python infer.py --adapter $(OUT) --prompt \"有没有能够滋养肝肾、清热明目的中药。\" --compare"

# The quick-start recipe on a real model (recipes/chinese_med.yaml, ~22 min on 2 CPU cores for
# 0.5B): train with 8 rows held out, ask the tutorial's question, then score base vs fine-tuned
# on the held-out rows. A rerun resumes or skips what is done.
QUICK := $(OUT)/chinese_med
quickstart: $(EVAL)
	$(BIN)/python train.py --config recipes/chinese_med.yaml --model $(MODEL) --output $(QUICK) --resume auto $(ARGS)
	$(BIN)/python infer.py --adapter $(QUICK) --instruction "使用中医知识正确回答适合这个病例的中成药。" \
		--input "肛门疼痛，痔疮，肛裂。" --compare --max-new-tokens 100
	$(BIN)/python infer.py --adapter $(QUICK) --file $(QUICK)/heldout.jsonl --score --compare \
		--max-new-tokens 160 --output $(QUICK)/heldout-answers.jsonl

test: $(DEV)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

# ruff: pyflakes, bugbear, import order, formatting (settings in pyproject.toml).
lint: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(DEV)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole pipeline offline on a tiny random model: proves the install, not the answers.
demo: $(EVAL)
	@echo "== demo: a tiny RANDOM Qwen-architecture model built here; its answers are meaningless."
	@echo "== 'make train' (or MODEL=/local/qwen make train) does the real job."
	HF_HUB_OFFLINE=1 $(BIN)/python tools/tiny_qwen.py $(DEMO_MODEL) --data $(DATA)
	HF_HUB_OFFLINE=1 $(BIN)/python train.py --model $(DEMO_MODEL) --data $(DATA) --output $(OUT)/demo --overwrite \
		--targets all-linear --rank 16 --alpha 32 --lr 1e-2 --epochs 8 --batch-size 8 --grad-accum 1 \
		--val-size 0.1 --eval-every 20 --save-every 40 --no-progress
	HF_HUB_OFFLINE=1 $(BIN)/python infer.py --adapter $(OUT)/demo --instruction "使用中医知识正确回答适合这个病例的中成药。" \
		--input "肛门疼痛，痔疮，肛裂。" --compare --max-new-tokens 40
	rm -f $(OUT)/demo/compare.jsonl   # --output resumes a previous file; the demo starts over
	HF_HUB_OFFLINE=1 $(BIN)/python infer.py --adapter $(OUT)/demo --file $(DATA) --compare --score --max-new-tokens 40 \
		--output $(OUT)/demo/compare.jsonl
	HF_HUB_OFFLINE=1 $(BIN)/python infer.py --adapter $(OUT)/demo --export $(OUT)/demo-merged
	@echo "== demo done: adapter in $(OUT)/demo, before/after in $(OUT)/demo/compare.jsonl, merged model in $(OUT)/demo-merged"

# The real Qwen2.5-Coder-0.5B on a quiet machine (~5 h on 2 cores): every contender with gradient
# checkpointing off and on (~1.5 h), then ours vs TRL at 256-2048 tokens (~3 h: the same 16 steps,
# 2 untimed, at 2048 tokens a step of TRL's takes 1-2 min), where the time goes (torch.profiler:
# ours vs TRL at each of those lengths, ours vs the tutorial on the main rows), then data
# preparation. docs/benchmark.md's tables are regenerated from the results JSON (--docs).
bench: $(DEV)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py --docs $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py --lengths 256,512,1024,2048 --batch-size 1 --grad-accum 2 --docs $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/op_profile.py --lengths 256,512,1024,2048 --steps 3 --warmup-steps 1 --batch-size 1 --grad-accum 2 --grad-checkpointing both $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/op_profile.py --contenders ours,tutorial --steps 3 --warmup-steps 1 --grad-checkpointing both $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/data_prep.py

# The same comparisons, shorter (~1 h): 6 steps (4 timed), lengths up to 1024, 20k synthetic rows.
# docs/benchmark.md is left alone.
bench-quick: $(DEV)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py --steps 6 --heldout 8 $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/run.py --lengths 256,512,1024 --steps 4 --batch-size 1 --grad-accum 4 $(ARGS)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/data_prep.py --rows 20000 --skip-train

# On a CUDA machine: ~20 steps of a random-init Qwen2.5-0.5B in bf16 and fp16 (loss falls, adapter
# reloads, tokens/s, peak memory). Without a GPU it says so and exits 0.
gpu-check: $(RUNTIME)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu_check.py $(ARGS)

clean:
	rm -rf $(OUT) .cache .pytest_cache $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
