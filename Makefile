# Quickstart: `make demo` (set up, then simulate the default federation) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build. Where the package index
# serves the CUDA build of 2.13.0, `make TORCH_INDEX=https://download.pytorch.org/whl/cpu ...`.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev,text,serve]"
	$(VENV)/bin/fedrec data fetch ml-100k
	touch $@

demo: setup
	$(VENV)/bin/fedrec simulate

# Three workers on two cores, each file's tests on one of them (module fixtures are built once),
# the files with the most slow tests first (src/fedrec/tests/conftest.py; --no-loadscope-reorder keeps that
# order): much of the suite waits on subprocesses, Ray's start-up and Flower's polling, which
# the other workers' tests fill (each worker runs one BLAS thread and one Ray actor per
# simulation: src/fedrec/tests/conftest.py). A clean-clone run on a 2-core machine: about 9-14 min
# of tests (README "Development"). (--dist loadgroup would keep the deployment files on one worker, but
# with pytest 9.2 and xdist 3.8 it does not group even a file marked xdist_group; they bind
# ports picked free.)
PYTEST := $(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow"

lint: setup
	$(VENV)/bin/ruff check src benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
