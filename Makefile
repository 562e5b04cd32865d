# Two commands from a fresh clone:
#   make bench   set up, then benchmark the built-in default model (BERT-base config, random weights)
#   make test    set up, then run the whole test suite (and the op micro-benchmarks once, untimed)
# Also: make lint (ruff), make gpu-check / gpu-check-quick (on a CUDA machine, see benchmarks/GPU.md).
#
# Setup is a virtual environment in .venv with torch, this package (editable, C++ extension built)
# and the test/benchmark extras. Override the torch requirement with TORCH_SPEC (e.g. a CUDA build).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.bert_fast-installed
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup bench test gpu-check gpu-check-quick lint clean

setup: $(STAMP)

$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation -e ".[test,bench,embed,ray]"
	$(PY) -c "import bert_fast.kernels._backend as b, torch; print('bert_fast: C++ extension', 'built' if b.cpp_usable(torch.device('cpu')) else 'NOT built')"
	touch $(STAMP)

bench: setup
	$(PY) -m bert_fast bench $(BENCH_ARGS)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)
	$(PY) -m pytest benchmarks -q --benchmark-disable

# GPU machines: uses the python that already has a CUDA torch (PYTHON=... to choose); no venv, no
# download. gpu-check is the whole run (about 9 minutes), gpu-check-quick the quick test tier only.
gpu-check:
	bash benchmarks/gpu_check.sh

gpu-check-quick:
	GPU_CHECK_TIER=quick bash benchmarks/gpu_check.sh

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf build *.egg-info bert_fast/_C*.so
