# `make demo` and `make test` work from a fresh clone: they create .venv
# (Python 3.11), install requirements.txt and the package, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast test-integration test-cluster docs clean wheelhouse gpu-check ablation

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

# Tiers (tests/conftest.py): unit (one process, `make test-fast`, under 2 minutes), integration
# (several processes, `lcl` end to end), cluster (a real Slurm cluster). `make test` runs all three.
# Unit and integration on two workers (pytest-xdist), a file each at a time (`TEST_WORKERS=0`: this
# process alone); then the Slurm cluster alone: its restart test's rendezvous timed out beside them.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests/unit tests/integration
	$(PY) -m pytest -q tests/cluster

test-fast: setup
	$(PY) -m pytest -q tests/unit

test-integration: setup
	$(PY) -m pytest -q tests/integration

test-cluster: setup
	$(PY) -m pytest -q tests/cluster

# A bare GPU machine without a network (Python 3.12, CUDA torch, triton, transformers installed):
# `make wheelhouse` here first (it needs PyPI), carry wheelhouse/ there, then `make gpu-check`.
WHEELHOUSE := wheelhouse
GPU_WHEEL_TAGS := --python-version 3.12 --implementation cp --only-binary=:all: \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux_2_12_x86_64

wheelhouse: setup
	rm -rf $(WHEELHOUSE).tmp && mkdir -p $(WHEELHOUSE).tmp
	grep -v -e '^#' -e '^deepspeed==' requirements-gpu.txt > $(WHEELHOUSE).tmp/binary.txt
	$(PY) -m pip download -q --no-deps $(GPU_WHEEL_TAGS) -d $(WHEELHOUSE).tmp -r $(WHEELHOUSE).tmp/binary.txt
	# DeepSpeed publishes only a source archive; its wheel is pure Python.
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(WHEELHOUSE).tmp "$$(grep '^deepspeed==' requirements-gpu.txt)"
	# The embedded corpus, built here: the GPU machine lacks scikit-learn, whose digits it holds.
	LCL_CACHE_DIR=$(WHEELHOUSE).tmp/cache $(PY) -c 'from lcl_megatron.data.embedded import ensure_corpus; ensure_corpus("digits")'
	rm $(WHEELHOUSE).tmp/binary.txt
	test "$$(du -sm $(WHEELHOUSE).tmp | cut -f1)" -le 60 || { du -sh $(WHEELHOUSE).tmp; echo "wheelhouse over 60 MiB"; exit 1; }
	rm -rf $(WHEELHOUSE) && mv $(WHEELHOUSE).tmp $(WHEELHOUSE)
	du -sh $(WHEELHOUSE)

GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) -m lcl_megatron.bench.gpu_check --wheelhouse $(WHEELHOUSE)

# docs/config.md is generated from the schema's field descriptions in lcl_megatron/config.py.
docs: setup
	$(PY) -m lcl_megatron.cli config keys --markdown > docs/config.md

clean:
	rm -rf $(VENV) runs .pytest_cache .gpu-site
