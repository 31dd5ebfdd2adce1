# `make demo` and `make test` work from a fresh clone: they create .venv
# (Python 3.11), install requirements.txt and the package, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast docs clean

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

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

# docs/config.md is generated from the schema's field descriptions in lcl_megatron/config.py.
docs: setup
	$(PY) -m lcl_megatron.cli config keys --markdown > docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache
