# Two entry points for a newcomer (see README.md):
#   make run   -> set up whatever is missing, then run the main job on data/
#   make test  -> set up whatever is missing, then ruff, mypy and the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench clean

setup: $(STAMP)

# torch first and pinned: 2.13.0 resolves to the local CPU wheel; an unpinned torch would pull CUDA packages.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/recsys-embed run $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check recsys_embed flows tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/recsys-embed bench $(ARGS)

clean:
	rm -rf outputs data/mlflow.db data/mlartifacts .pytest_cache .mypy_cache .ruff_cache
