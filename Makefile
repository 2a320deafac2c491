# Two entry points for users: `make demo` and `make test`. Each sets up its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench-env

# micro-sam is not a dependency of the pipeline: installed without its dependencies (as in bench-env) only so that
# `make test` runs the parity tests against it (tests/test_parity_micro_sam.py).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps micro-sam==1.8.14
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipeline_lib demo --out demo_data

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

# Benchmarks against micro-sam need it installed; it is not a dependency of the pipeline.
bench-env: .venv-bench/.installed
.venv-bench/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install --quiet --upgrade pip
	.venv-bench/bin/pip install --quiet -e ".[test]"
	.venv-bench/bin/pip install --quiet --no-deps micro-sam==1.8.14
	touch $@

clean:
	rm -rf $(VENV) demo_data results .snakemake
