# Two entry points for a newcomer (see README.md):
#   make run   -> set up whatever is missing, then run the main job on data/
#   make test  -> set up whatever is missing, then ruff, mypy and the test suite
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup run test lint bench clean pg-server

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

# PostgreSQL server binaries let tests/serving/test_dbexport.py start a throwaway server (initdb + pg_ctl); without
# them those cases skip with the reason. On a Debian/Ubuntu CI box running as root they are installed here.
pg-server:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	    (apt-get update -qq && apt-get install -y -qq postgresql >/dev/null) || \
	    echo "PostgreSQL binaries not installed: PostgreSQL export tests will skip (apt-get install postgresql)"; }

test: lint pg-server
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/recsys-embed bench $(ARGS)

clean:
	rm -rf outputs data/mlflow.db data/mlartifacts .pytest_cache .mypy_cache .ruff_cache
