# ttt-train: `make demo` runs the main job on a tiny default, `make test` runs the test suite.
# Both install what they need into .venv first (once; again only when pyproject.toml changes).

PYTHON_BASE ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test test-fast demo lint bench clean

setup: $(STAMP)

# torch is installed first and pinned, so nothing later can pull a CUDA build on a CPU machine.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

demo: setup
	$(PY) -m ttt_train.demo

lint: setup
	$(PY) -m ruff check ttt_train data_tools tests

bench: setup
	$(PY) -m ttt_train.ops.bench --json

clean:
	rm -rf $(VENV) .pytest_cache
