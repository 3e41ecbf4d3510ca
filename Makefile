# Two commands for a newcomer: `make run` (install + train on the built-in synthetic set)
# and `make test` (install + run the test suite). Both create .venv on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=

.PHONY: setup run test test-fast clean

setup: $(STAMP)

# torch first, pinned, so that nothing later (deepspeed's build) pulls in another torch.
$(STAMP): setup.cfg pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m tumorseg_dist.train $(ARGS)

# Two test files at a time (one per core on the 2-core CI box, at most 4): most tests run one
# single-threaded process, so a second file fills the other core. A file stays on one worker
# (--dist loadgroup, groups set in tests/conftest.py), so its module fixtures are made once;
# the docs pages spread over the workers.
XDIST   := -n auto --maxprocesses 4 --dist loadgroup

test: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest $(XDIST) -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
