# pretrain-pipeline. On a fresh machine: `make smoke` (whole pipeline on CPU) or `make test`.
# Every target installs what it needs through `make setup` (a venv in .venv, pins in
# requirements/constraints.txt); torch is installed first, on its own, so pip never pulls a
# multi-GB CUDA build on a CPU machine.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# CPU build by default. GPU cluster: make setup TORCH_SPEC="torch==2.13.0" TORCH_PIP_ARGS="--index-url <CUDA wheel index>"
TORCH_SPEC     ?= torch==2.13.0
TORCH_PIP_ARGS ?=
CONFIG ?= configs/smoke.yaml
RUN    ?=
ARGS   ?=
PYTEST_ARGS ?=

export PRETRAIN_PIPELINE_STATE ?= $(CURDIR)/.state
export PREFECT_HOME ?= $(PRETRAIN_PIPELINE_STATE)/prefect
export TORCH_EXTENSIONS_DIR ?= $(PRETRAIN_PIPELINE_STATE)/torch_extensions
export RAY_USAGE_STATS_ENABLED = 0
export DO_NOT_TRACK = 1

.PHONY: setup smoke ablate-smoke test test-fast test-gpu pretrain run server deploy lock clean-runs help bench-setup bench-clean browser bench-tokenize bench-train soak

help:
	@echo "make smoke     whole pipeline on CPU on a bundled sample corpus (runs/smoke/)"
	@echo "make test      the test suite (unit + integration with real Ray/DeepSpeed/Prefect)"
	@echo "make test-gpu  the CUDA path on this machine's GPU (bf16, NCCL, flash attention, ZeRO-1/3 resume, export)"
	@echo "make ablate-smoke  three data recipes on CPU, one tiny proxy each: which makes the better model (runs/ablate-smoke/)"
	@echo "make pretrain  the whole pipeline with configs/gpt2-124m.yaml (GPU cluster)"
	@echo "make run CONFIG=configs/x.yaml ARGS='--set train.max_steps=10'"
	@echo "make server    a local Prefect server on 127.0.0.1:4200 (UI), database under .state/"
	@echo "make deploy    serve the flows as deployments to that server (UI Run button)"

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -c requirements/constraints.txt -e '.[dev,onnx,eval,gguf]'
	touch $(STAMP)

smoke: $(STAMP)
	$(BIN)/pretrain-pipeline run --config configs/smoke.yaml $(ARGS)
	@echo "report: runs/smoke/report.md   model: runs/smoke/export/hf"

ablate-smoke: $(STAMP)
	$(BIN)/pretrain-pipeline ablate --config configs/ablate-smoke.yaml $(ARGS)
	@echo "answer: runs/ablate-smoke/report.md"

run: $(STAMP)
	$(BIN)/pretrain-pipeline run --config $(CONFIG) $(ARGS)

pretrain: $(STAMP)
	$(BIN)/pretrain-pipeline run --config configs/gpt2-124m.yaml $(ARGS)

# The UI test drives Debian's Chromium; install it when we can (root with apt), else that test skips.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "note: chromium not installed; the browser test will be skipped"

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

# The CUDA path on this machine's GPU (tests/test_gpu.py; they skip without CUDA).
test-gpu: $(STAMP)
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

# The fault-injection suite at length (not part of `make test`): each kill test makes
# SOAK_ROUNDS kills at points drawn from each of SOAK_SEEDS (training ranks killed and resumed on
# another cluster shape included), the spike test SOAK_ROUNDS spikes; the data-stage kill test runs once per seed.
SOAK_ROUNDS ?= 5
SOAK_SEEDS  ?= 1 2 3
soak: $(STAMP)
	@set -e; for seed in $(SOAK_SEEDS); do \
	  echo "== soak: fault seed $$seed, $(SOAK_ROUNDS) rounds"; \
	  PRETRAIN_PIPELINE_FAULT_SEED=$$seed PRETRAIN_SOAK_ROUNDS=$(SOAK_ROUNDS) \
	    $(BIN)/python -m pytest -x -q tests/reliability tests/test_train_resume.py tests/test_train_heal.py \
	      tests/test_train_reshard_resume.py $(PYTEST_ARGS); \
	done

# No telemetry: it would try the network at start and log an error where there is none.
server: $(STAMP)
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/prefect server start --host 127.0.0.1 --port 4200

# Serve the deployments (needs `make server` running); the UI's Run button then starts them here.
deploy: $(STAMP)
	PREFECT_API_URL=$${PREFECT_API_URL:-http://127.0.0.1:4200/api} $(BIN)/python -m flows.deploy --config $(CONFIG) $(ARGS)

# Benchmarks print ratios against a baseline measured in the same run; never part of `make test`.
bench-setup: $(STAMP)
	$(BIN)/python -m pip install -c requirements/constraints.txt -e '.[dev,onnx,eval,gguf,bench]'

bench-clean: bench-setup
	$(BIN)/python bench/clean/run.py --mode filters --docs 8000 --cores 2
	$(BIN)/python bench/clean/run.py --mode minhash --docs 8000 --cores 2
	$(BIN)/python bench/clean/run.py --mode scale --docs 4000 --cores 2
	$(BIN)/python bench/clean/run.py --mode onefile --docs 70000 --cores 2
	$(BIN)/python bench/clean/run.py --mode split --docs 8000 --cores 2
	$(BIN)/python bench/clean/boilerplate.py

# Two sizes: Ray Data's fixed start-up cost (~1.5 s) weighs on 32 MiB and is amortised at 128 MiB.
bench-tokenize: $(STAMP)
	$(BIN)/python bench/tokenize/run.py --cores 2 $(ARGS)

# Our trainer (launch_training: ZeRO-1/3, 1 and 2 ranks) vs a plain PyTorch loop, and ZeRO 0-3 memory per rank.
bench-train: $(STAMP)
	$(BIN)/python bench/train/run.py $(ARGS)

lock: $(STAMP)
	{ head -n 3 requirements/constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/+cpu//' | sort -f; } > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean-runs:
	rm -rf runs
