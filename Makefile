# Two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip command as everything else: on its own, lightning would
# resolve to a multi-GB CUDA build of torch (see ENVIRONMENT.md).
TORCH := torch==2.13.0

.PHONY: demo test lint venv clean bench docs

$(BIN)/needlework: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" -e ".[dev]"
	touch $(BIN)/needlework

venv: $(BIN)/needlework

demo: venv
	$(BIN)/needlework demo --method ips --out runs/demo

lint: venv
	$(BIN)/ruff check src tests benchmarks

test: venv lint
	$(BIN)/python -m pytest -q

# API reference and architecture pages (mkdocs + mkdocstrings) into site/
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: venv
	$(BIN)/python benchmarks/ats_vs_dense.py

clean:
	rm -rf $(VENV) runs build site *.egg-info src/*.egg-info
