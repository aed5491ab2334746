# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Set-up is part of both: a virtual environment in .venv, the CPU build of torch, then sterling.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
# Extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH_PIP_ARGS ?=
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e ".[dev,bench,serve,ray]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sterling demo

test: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/lint-imports
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
