# One command per job; each installs what it needs first (a fresh clone needs only `make demo`).
# TORCH picks the PyTorch build: the default pin takes the CPU wheel on CPU-only machines that
# carry one locally, and PyPI's CUDA build elsewhere. For a specific CUDA build:
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: install train demo data reproduce eval test test-slow bench efficiency approximation gpu-check gpu-train-check gpu-lra gpu-wheels triton-compat lint dashboard-pictures

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(STAMP)

# The MRA paper's ListOps recipe with MRA-2 (2 layers, width 64, 5000 steps at length 2048): a GPU
# recipe; on a CPU it says after its first steps how many hours it would take.
train: $(STAMP)
	$(BIN)/python train.py task=listops attn=mra $(ARGS)

# A ListOps run sized for a 2-core CPU: generates a small ListOps set, trains, prints accuracy
# (1 min 46 s of train.py on a quiet 2-core AMD EPYC, after the install).
demo: $(STAMP)
	$(BIN)/python train.py experiment=demo $(ARGS)

# The README's dashboard pictures from a real run (docs/dashboards.md): RUN=<folder> (trained with
# the demo and both loggers unless it holds results.json), OUT=docs/img; needs headless Chromium.
dashboard-pictures: $(STAMP)
	PYTHON=$(BIN)/python bash scripts/dashboard_pictures.sh $(ARGS)

# Find (or generate), verify and cache one task's data: make data TASK=text SOURCE=~/aclImdb_v1.tar.gz
# (TASK=all: every task, a Hydra -m sweep; ARGS: overrides as train.py takes them).
TASK ?= listops
SOURCE ?=
data: $(STAMP)
	$(BIN)/python -m mra_lra.data.prepare $(if $(filter all,$(TASK)),-m,task=$(TASK)) \
		$(if $(SOURCE),source=$(SOURCE)) $(ARGS)

# One row group of the paper table: softmax, MRA-2 and MRA-2-s on TASK with seeds 0-2 on one GPU,
# then the report. The MRA paper's recipe (task=TASK attn=...), or RECIPE=lra_jax: the original LRA
# code's (recipe=lra_jax, conf/recipe/). On a CPU-only machine add ARGS=trainer=cpu.
RECIPE ?=
REPRO_DIR ?= runs/reproduce/$(if $(RECIPE),$(RECIPE)/)$(TASK)
reproduce: $(STAMP)
	$(BIN)/python train.py -m task=$(TASK) attn=softmax,mra,mra_s $(if $(RECIPE),recipe=$(RECIPE)) \
		trainer=gpu seed=0,1,2 hydra.sweep.dir=$(REPRO_DIR) $(ARGS)
	$(BIN)/python -m mra_lra.bench.report $(REPRO_DIR) --out $(REPRO_DIR)/report.md \
		--plot $(REPRO_DIR)/acc_vs_speed.png

# Evaluate a run's checkpoint again from its config.yaml: make eval RUN=runs/<date>/<run> (ARGS:
# ckpt=last, split=[val,test], run.attn=softmax, run.attn.block_per_row=16, -m with a list).
RUN ?=
eval: $(STAMP)
	$(BIN)/python eval.py run_dir=$(RUN) $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m mra_lra.bench.attention $(ARGS)

# LRA's efficiency table for whole models (steps/s and memory against softmax): ARGS="--attn
# softmax,mra,mra_s --n 1024,2048,4096 --batch 32 --out bench_out"
efficiency: $(STAMP)
	$(BIN)/python -m mra_lra.bench.efficiency $(ARGS)

# Error against exact softmax and forward time, on synthetic inputs or a trained run's q, k, v:
# ARGS="--run runs/<date>/<run> --sweep mra.block_per_row=1,2,4,8 --out approx_out"
approximation: $(STAMP)
	$(BIN)/python -m mra_lra.bench.approximation $(ARGS)

# On a CUDA machine: GPU tests, Triton vs torch in every dtype, and the benchmark; tables go to $OUT.
# Needs only torch, triton, numpy (no install step: GPU images carry their own torch).
gpu-check:
	bash scripts/gpu_check.sh

# On a CUDA machine, after gpu-check: train.py, eval.py and LRA's efficiency table end to end on
# the GPU (a 5-minute budget, BUDGET_S). GPU images lack hydra: `make gpu-wheels` (where PyPI is reachable)
# puts its wheels in .whl/, which the script unpacks there.
gpu-train-check:
	bash scripts/gpu_train_check.sh

# On a CUDA machine, in one device command of about 8 minutes (BUDGET_S): ListOps at the release's
# sizes, generated on all cores, and the MRA paper's recipe for softmax, mra and mra_s (in that
# order, as far as the budget goes); results, metrics and report.md go to $OUT. Needs .whl/ as
# gpu-train-check does; knobs and a CPU dry run in the script's header.
gpu-lra:
	bash scripts/gpu_lra.sh

# The pure-Python packages of the training path that GPU images lack (hydra, omegaconf, rich and
# their dependencies), as wheels for the GPU scripts to unpack; fails on one that is not pure
# Python.
gpu-wheels: $(STAMP)
	mkdir -p .whl
	$(BIN)/pip download -q --no-deps -d .whl hydra-core==1.3.8 omegaconf==2.3.1 rich==15.0.0 \
		markdown-it-py==4.3.0 mdurl==0.1.2 pygments==2.21.0
	$(BIN)/pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
	! ls .whl/*.whl | grep -v -- '-none-any\.whl$$'

# The Triton tests (interpreter, and the sm_90 compile of every kernel) under the GPU image's
# Triton release, in a venv of their own: make triton-compat TRITON_VERSION=3.6.0; add
# TORCH=torch==2.11.0 for the image's torch too (a CUDA build of about 3 GB; it runs on CPU).
TRITON_VERSION ?= 3.6.0
triton-compat:
	TORCH="$(TORCH)" TRITON_VERSION=$(TRITON_VERSION) bash scripts/triton_compat.sh $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
