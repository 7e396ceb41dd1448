# The two commands: `make run` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt
STUDY_ARGS ?= --quick --force

.PHONY: run test bench clean

run: $(VENV)/.run-installed
	$(VENV)/bin/paramshare study $(STUDY_ARGS)

test: $(VENV)/.dev-installed
	$(PY) -m pytest -q

bench: $(VENV)/.bench-installed
	@for f in benchmarks/[!_]*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[study]'
	@touch $@

$(VENV)/.dev-installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[dev]'
	@touch $@ $(VENV)/.run-installed

$(VENV)/.bench-installed: pyproject.toml constraints.txt | $(PY)
	$(PIP) -e '.[dev,bench]'
	@touch $@ $(VENV)/.dev-installed $(VENV)/.run-installed

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
