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

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
