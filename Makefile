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

.PHONY: install demo test test-full bench lint clean

install: $(STAMP)

# CPU machines take the local CPU wheel of torch first; an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/loragen experiment=dnd_minilm

test: $(STAMP)
	$(VENV)/bin/pytest -m "not slow" -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

test-full: $(STAMP)
	$(VENV)/bin/pytest -q; rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

bench: $(STAMP)
	$(PY) -m loragen.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
