# `make demo` and `make test` each do the whole set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export MAX_JOBS ?= 2
PYTEST_ARGS ?=

EXT_SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h) setup.py

.PHONY: demo test build clean bench

demo: $(VENV)/.built
	$(PY) -m demem_ext.cli train

test: $(VENV)/.built
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.built
	$(PY) benchmarks/bench_fused.py

build: $(VENV)/.built

$(VENV)/.deps: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt setuptools wheel ninja torch torchvision
	$(PIP) install -q -c constraints.txt numpy scikit-learn scipy tqdm matplotlib dp-accounting \
		pytest hypothesis opacus torchattacks lightning accelerate
	touch $@

# Builds demem_ext._C (C++ CPU kernels; CUDA kernels when torch is a CUDA build and nvcc exists).
$(VENV)/.built: $(VENV)/.deps $(EXT_SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import demem_ext as dx; print('demem_ext backend:', dx.backend(), '| CUDA kernels compiled:', dx.ops.extension_has_cuda())"
	touch $@

clean:
	rm -rf build demem_ext/_C*.so demem_ext.egg-info $(VENV)
