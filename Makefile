# loragen: `make demo` and `make test` set everything up on a fresh machine.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Development and CI read the shared local copy of the datasets when it is there.
SHARED_DATA := $(abspath ../shared/data/commonsense)
export LORAGEN_DATA_DIR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)
export SWANLAB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-full gpu-check bench lint clean

install: $(STAMP)

# CPU machines take the local CPU wheel of torch first; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# make demo RUN_DIR=<dir>: the demo in that run dir; the same command again resumes it (finished steps are
# skipped). ARGS: more Hydra overrides, e.g. make demo RUN_DIR=/tmp/demo ARGS="+debug=tiny".
RUN_DIR ?=
ARGS    ?=

demo: $(STAMP)
	$(VENV)/bin/loragen experiment=dnd_minilm $(if $(RUN_DIR),"hydra.run.dir=$(RUN_DIR)") $(ARGS)

test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow and not gpu" -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# Everything, the GPU tests (tests/gpu) included: without CUDA they are reported skipped with the reason.
test-full: $(STAMP)
	$(VENV)/bin/pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# A GPU machine's first command: `pytest -m gpu`, then one timed step of each GPU experiment against the
# README's Scaling estimates -> bench/gpu_check.json. Exit 0 passed, 1 failed, 3 no CUDA device.
gpu-check: $(STAMP)
	@PY=$(PY) bash scripts/gpu_check.sh

bench: $(STAMP)
	$(PY) -m loragen.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
