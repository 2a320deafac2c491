# Two entry points for users: `make demo` and `make test`. Each sets up its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench-env

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipeline_lib demo --out demo_data

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

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
