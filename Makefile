# One command to set up and run the demo, one to set up and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# bench: lightly and vit-pytorch beside ours; wandb, mlflow: the trackers, tested offline; hf: the transformers export
TEST_EXTRAS := dev,bench,wandb,mlflow,hf

.PHONY: setup demo test mutants

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -e ".[dev]"

demo: setup  # a small study: four objectives and the baseline at one FLOP budget, on the embedded digits
	$(BIN)/python -m ssl_vit.study studies/demo.toml --out runs/demo-study

test: $(BIN)/python
	$(BIN)/pip install -e ".[$(TEST_EXTRAS)]"
	$(BIN)/python -m pytest -q

mutants: $(BIN)/python  # is every named bug caught by the tests? (about 25 minutes on 2 cores; not run by CI)
	$(BIN)/pip install -e ".[$(TEST_EXTRAS)]"
	$(BIN)/python tools/mutants.py
