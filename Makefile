# `make demo` and `make test` create (or reuse) the virtual environment $(VENV) first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.macsc-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export JSONARGPARSE_DEPRECATION_WARNINGS ?= off

.PHONY: install demo test lint format bench clean

# Reinstalled only when the requirements or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PYTHON) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PYTHON) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/macsc fit --config lightning_configs/demo.yaml

test: $(STAMP)
	$(PYTHON) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PYTHON) benchmarks/run_all.py

clean:
	rm -rf runs lightning_logs .pytest_cache
