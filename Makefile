# make test / make demo set everything up on a fresh machine: a .venv, the CPU torch wheel
# that lies on these machines (torch==2.13.0), triton, test deps (dask[distributed]: the study
# on a local cluster), and the package (editable, extension built in place and rebuilt
# incrementally with ninja when csrc/ changes).
PYTHON ?= python3
# The PATH make was called with: gpu-check runs the machine's own python, never .venv's.
CALLER_PATH := $(PATH)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.sparsecore-installed
TORCH_SPEC ?= torch==2.13.0
export PATH := $(abspath $(VENV))/bin:$(PATH)
PYTEST_ARGS ?=

.PHONY: install ext test lint demo bench bench-baselines gpu-check clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q triton numpy scipy tqdm matplotlib scikit-learn \
		pytest pytest-xdist ruff==0.17.6 ninja setuptools wheel "dask[distributed]"
	SPARSECORE_BUILD_EXT=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP) ext

# Incremental in-place build of sparsecore._C (ninja); the lock keeps parallel builds apart.
# It lives in the repository's own build/ (not a shared /tmp path another user could plant
# or hold), and waits at most 20 minutes for another build before giving up.
ext: $(STAMP)
	mkdir -p build
	flock -w 1200 build/.sparsecore-build.lock $(PY) setup.py -q build_ext --inplace

test: install
	$(PY) -m ruff check sparsecore kernels bench tests setup.py
	$(PY) -m pytest -n 2 -q $(PYTEST_ARGS)

demo: install
	$(PY) -m sparsecore study --preset default --out runs/demo

# onnx: torch.onnx.export needs it for the ONNX Runtime / DeepSparse columns of `bench models`
# (a bench tool, not a dependency of the package).
bench: install
	$(PY) -m pip install -q onnx
	$(PY) -m bench layers

# The baselines of `python -m bench models`, each in a venv of its own (never dependencies of
# sparsecore): ONNX Runtime, and DeepSparse 1.8.0, which needs numpy<2 and onnx<1.17 and a
# Python of at most 3.11 (1.9.0 does not build). The bench uses them when they exist.
DS_PYTHON ?= $(PYTHON)
bench-baselines:
	test -x .venv-ort/bin/python || $(PYTHON) -m venv .venv-ort
	.venv-ort/bin/python -m pip install -q onnxruntime numpy
	test -x .venv-deepsparse/bin/python || $(DS_PYTHON) -m venv .venv-deepsparse
	.venv-deepsparse/bin/python -m pip install -q "deepsparse==1.8.0" "numpy<2" "onnx<1.17"

# On a GPU machine: install into its python, gpu tests, GPU bench rows (bench/gpu_check.py).
# DRY_RUN=1 stops before the first step that needs CUDA; SKIP_INSTALL=1 reuses the install;
# GPU_CHECK_ARGS: more flags (e.g. --budget tests=240).
gpu-check:
	env PATH="$(CALLER_PATH)" $(PYTHON) bench/gpu_check.py $(if $(filter 1,$(DRY_RUN)),--dry-run) \
		$(if $(filter 1,$(SKIP_INSTALL)),--skip-install) $(GPU_CHECK_ARGS)

clean:
	rm -rf build sparsecore/_C*.so *.egg-info
