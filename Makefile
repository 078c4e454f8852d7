# The commands the README shows. `make setup` is idempotent and runs before the others.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo up typecheck test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(wildcard protos/cdp/*/*.proto protos/cdp/*/v1/*.proto) scripts/gen_protos.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip==25.3
	$(BIN)/pip install --quiet grpcio-tools==1.85.1 setuptools==80.9.0 mypy-protobuf==5.1.0 \
		types-protobuf==7.35.1.20260906
	rm -rf gen
	$(BIN)/python scripts/gen_protos.py
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(BIN)/cdp demo

up: setup
	$(BIN)/cdp up

# mypy --strict over the packages listed in pyproject.toml ([tool.mypy] files).
typecheck: setup
	$(BIN)/mypy

test: setup typecheck
	$(BIN)/python -m pytest -q

# The whole platform against raw JetStream (bench/suite.md); e.g. make bench BENCH_ARGS=--smoke
bench: setup
	$(BIN)/cdp bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) gen .cdp
