# pluginlab: `make demo` (set up + run the main job) and `make test` (set up + run every test).
# Both create a local virtual environment in .venv on first use; nothing is installed globally.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/pluginlab demo --out out/demo.wav

test: setup
	$(PY) -m pytest -q

bench: setup
	for f in bench/bench_*.py; do $(PY) $$f || exit 1; done

lint: setup
	$(VENV)/bin/ruff check pluginlab tests bench
	$(VENV)/bin/mypy pluginlab

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
