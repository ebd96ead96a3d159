# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup demo test mutants

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -e ".[dev]"

demo: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no recipes/masked_patch.py

test: $(BIN)/python
	$(BIN)/pip install -e ".[dev,bench,hf]"  # bench: lightly and vit-pytorch beside ours; hf: the transformers export
	$(BIN)/python -m pytest -q

mutants: $(BIN)/python  # is every named bug caught by the tests? (about 15 minutes on 2 cores; not run by CI)
	$(BIN)/pip install -e ".[dev,bench,hf]"
	$(BIN)/python tools/mutants.py
