# `make demo` and `make test` work from a fresh clone: they create .venv
# (Python 3.11), install requirements.txt and the package, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast ablation clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-oracle.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, alone: the CPU wheel comes from the local wheel store when there is one.
	$(PY) -m pip install -q "$$(grep '^torch==' requirements.txt)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-oracle.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/lcl train --config configs/demo.yaml

# The LCL paper's Table 1 in miniature (docs/ablation.md); ARMS=lcl,emu SEEDS=0 runs a subset.
ARMS ?= untrained,lcl,generation,emu,contrastive,pairs-lcl,pairs-contrastive
SEEDS ?= 0,1,2
JOBS ?= 2
ablation: setup
	OMP_NUM_THREADS=1 $(PY) -m lcl_megatron.ablation --arms $(ARMS) --seeds $(SEEDS) --jobs $(JOBS)

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache
