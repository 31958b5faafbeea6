# The two commands a newcomer needs; each sets up what it needs first (a .venv with the CPU torch
# wheel pinned before the project, so pip never pulls the ~5.5 GB CUDA build).
#
#   make demo    verify the bundled HF Llama at 2, 4 and 8 ranks
#   make test    the test suite, as CI runs it (.ci/run); `make test-all` adds the slow tests
#
# A CUDA machine: `make test TORCH=torch` (or any pip requirement for torch) takes the CUDA build.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test test-all gpu clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

demo: $(STAMP)
	$(VENV)/bin/autosp-verify fixtures/hf_llama.py --world-size 2,4,8 --seq-len 16,13

test: $(STAMP)
	$(VENV)/bin/pytest -n auto

test-all: $(STAMP)
	$(VENV)/bin/pytest -n auto -m "slow or not slow"

gpu: $(STAMP)
	$(VENV)/bin/pytest -m gpu

clean:
	rm -rf $(VENV) .torch_extensions .hypothesis .pytest_cache
