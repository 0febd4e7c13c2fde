# The two commands of the README: `make run` (set-up + the main job) and `make test`
# (set-up + the whole suite on 8 emulated CPU devices, plus ruff).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed-run: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed-run

run: $(VENV)/.installed-run
	$(PY) -m experiments.gemma_warp $(ARGS)

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(PY) -m experiments.benchmarks.merging
	$(PY) -m experiments.benchmarks.sampling
	$(PY) -m experiments.benchmarks.train_step
	$(PY) -m experiments.benchmarks.update_memory --sizes tiny,100m

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
