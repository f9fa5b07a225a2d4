# `make demo` and `make test` create (or reuse) the virtual environment $(VENV) first.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.macsc-installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export JSONARGPARSE_DEPRECATION_WARNINGS ?= off

.PHONY: install demo test lint format bench table mutation clean

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

# A whole table of the paper: `make table T=1` (T=1,4 or T=all); ARGS=--dry-run prints the
# commands, ARGS=--slurm writes an sbatch array script instead (scripts/table_rows.yaml lists the rows).
table: $(STAMP)
	@test -n "$(T)" || { echo "make table: name the table, e.g. make table T=1 (or T=1,4 or T=all)"; exit 2; }
	$(PYTHON) scripts/run_table.py --table $(T) $(ARGS)

# Mutation testing of the method's core with mutmut (~20 min on 2 cores; not part of CI):
# docs/mutation-testing.md. ARGS=--report prints the last run's report again.
# mutmut is installed here only: CI and the tests do not need it.
mutation: $(STAMP)
	$(PYTHON) -c "import mutmut" 2>/dev/null || $(PYTHON) -m pip install --disable-pip-version-check -q 'mutmut>=3.8'
	$(PYTHON) scripts/mutation.py $(ARGS)

clean:
	rm -rf runs lightning_logs .pytest_cache mutants
