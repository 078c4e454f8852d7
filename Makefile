# The commands the README shows. `make setup` is idempotent and runs before the others.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo up test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard protos/cdp/*/*.proto protos/cdp/*/v1/*.proto) scripts/gen_protos.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet grpcio-tools==1.85.1 setuptools==80.9.0
	rm -rf gen
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/cdp demo

up: setup
	$(BIN)/cdp up

test: setup
	$(BIN)/python -m pytest -q

# The whole platform against raw JetStream (bench/suite.md); e.g. make bench BENCH_ARGS=--smoke
bench: setup
	$(BIN)/cdp bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) gen .cdp
