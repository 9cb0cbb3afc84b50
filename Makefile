# Two entry points for a fresh machine: `make demo` (the 3-way, 20-epoch comparison)
# and `make test`. Each creates .venv and installs what it needs first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# constraints.txt pins torch to the build these machines carry; elsewhere any recent
# torch works: `make demo CONSTRAINTS=` lets pip choose.
CONSTRAINTS ?= constraints.txt
PIP    := $(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
ARGS   ?=
# Offline copy of MNIST beside the checkout (as on the project's machines and in CI), used
# when NORMLAB_DATA is not set; otherwise normlab downloads MNIST into its cache.
NORMLAB_DATA ?= $(if $(wildcard ../shared/data/mnist/t10k-labels-idx1-ubyte.gz),$(abspath ../shared/data/mnist))
export NORMLAB_DATA

.PHONY: demo test bench lint summary docs docs-serve dist clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	@touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PIP) -e '.[docs]'
	@touch $@

demo: $(VENV)/.installed  ## the full comparison: 3 variants x 20 epochs, then the report
	$(BIN)/normlab compare $(ARGS)

bench: $(VENV)/.installed  ## throughput, and one study epoch, vs the per-sample DataLoader way
	$(BIN)/python benchmarks/throughput.py $(or $(ARGS),--out benchmarks/results/cpu.json)
	$(BIN)/python benchmarks/study_epoch.py --out benchmarks/results/study-epoch-cpu.json

summary: $(VENV)/.installed
	$(BIN)/normlab summary

test: $(VENV)/.installed-dev  ## lint, then the whole test suite
	$(BIN)/ruff check .
	$(BIN)/pytest $(ARGS)

docs: $(VENV)/.installed-docs  ## the documentation site into site/ (strict: any warning fails)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	$(BIN)/python docs/check_site.py
	$(BIN)/python docs/check_browser.py  # every page in headless Chromium, where installed

docs-serve: $(VENV)/.installed-docs  ## the site at http://127.0.0.1:8000, rebuilt on edits
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

dist: $(VENV)/.installed-dev  ## a wheel and a source archive into dist/
	$(BIN)/python -m build --outdir dist .

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site
