# Quick start: `make demo` (set up + generate with the embedded model), `make test` (set up + run the tests).
#
# torch: TORCH=cpu (default) installs the CPU build from PyTorch's CPU wheel index when it
# is reachable, else `pip install torch==$(TORCH_VERSION)` from pip's configured sources
# (works offline with a local wheel); TORCH=cuda installs PyPI's CUDA build (or
# TORCH_INDEX=https://download.pytorch.org/whl/cu128 for another CUDA version).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= cpu
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned (or PyPI-resolved) torch would pull GBs of CUDA wheels.
	sh tools/install_torch.sh $(BIN)/python $(TORCH_VERSION) $(TORCH) $(TORCH_INDEX)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/aiosched generate "def fibonacci(n):" --max-tokens 64 --stats

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV)
