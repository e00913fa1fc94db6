# pacsai: `make run` installs and starts the node on its embedded defaults; `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install run test lint bench clean

install: $(VENV)/.installed

# deploy/install.sh is the one install procedure (CI, container images, bare metal): torch first,
# pinned (a bare `torch` requirement would pull several GB of CUDA packages), then pacsai.
$(VENV)/.installed: pyproject.toml deploy/install.sh
	PYTHON=$(PYTHON) PACSAI_EXTRAS=dev PACSAI_EDITABLE=1 ./deploy/install.sh $(VENV)
	touch $@

run: install
	$(BIN)/pacsai serve $(if $(CONFIG),--config $(CONFIG))

# Two processes (pytest-xdist): most tests wait on sockets, processes and quiet windows, so the
# suite takes about 60% of the time it takes in one process, even on 2 cores.
PYTEST_ARGS ?= -n 2

test: install
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check src tests bench models
	$(BIN)/ruff format --check src tests bench models
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/receive.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
