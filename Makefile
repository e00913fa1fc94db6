# pacsai: `make run` installs and starts the node on its embedded defaults; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

# torch first, pinned: a bare `torch` requirement would pull several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

run: install
	$(BIN)/pacsai serve $(if $(CONFIG),--config $(CONFIG))

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests bench models
	$(BIN)/ruff format --check src tests bench models
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/receive.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
