# Two entry points for a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch/torchvision pinned to the pair that imports together on CPU here (see docs/INSTALL notes in README).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
export OMP_NUM_THREADS ?= 1
export DS_ACCELERATOR ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions

.PHONY: env test demo lint bench clean wheels gpu-dry-run

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[dev,triton]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check sere_scale data_prep tests benchmarks
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m sere_scale demo

lint: $(STAMP)
	$(VENV)/bin/ruff check sere_scale data_prep tests benchmarks
	$(VENV)/bin/lint-imports

# .whl/: deepspeed, webdataset and their missing needs as wheels for the GPU machine (Python 3.12, x86-64)
wheels: $(STAMP)
	PYTHON=$(PY) bash benchmarks/prepare_wheels.sh

# the GPU session's plumbing on this CPU (tiny sizes, plus steps that fail, hang and get skipped)
gpu-dry-run: $(STAMP)
	DEVICE=cpu SELFTEST=1 PYTHON=$(abspath $(PY)) OUT=$(abspath runs/gpu_session_dry) bash benchmarks/gpu_session.sh

clean:
	rm -rf runs demo_data .pytest_cache
