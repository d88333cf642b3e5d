# pluginlab: `make lab` (set up + open JupyterLab on the quickstart notebook) and `make test`
# (set up + run every test). `make demo` renders a chain to a WAV without a browser.
# Both create a local virtual environment in .venv on first use; nothing is installed globally.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# JupyterLab refuses to start as root (containers, CI boxes) unless told it may
AS_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab demo serve test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --ip=127.0.0.1 $(AS_ROOT) notebooks/01_quickstart.ipynb

demo: setup
	$(VENV)/bin/pluginlab demo --out out/demo.wav

serve: setup
	$(VENV)/bin/pluginlab serve

test: setup
	$(PY) -m pytest -q --nbmake tests notebooks

bench: setup
	for f in bench/bench_*.py; do $(PY) $$f || exit 1; done

lint: setup
	$(VENV)/bin/ruff check pluginlab tests bench
	$(VENV)/bin/mypy pluginlab

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
