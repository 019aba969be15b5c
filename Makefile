# The verbs a newcomer types. Everything a target needs is installed by the target.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast bench lint fmt clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# OS tools the tests exercise for real (independent BLAKE3, sandbox, desktop files, browser).
system-deps:
	@bash scripts/system-deps.sh

demo: $(STAMP)
	@bash demo/run.sh

test: lint system-deps
	$(BIN)/pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(BIN)/pytest -q -x -n 2

bench: $(STAMP) system-deps
	@bash scripts/system-deps.sh --bench
	$(BIN)/python bench/run.py

# ruff, then the layers contract in pyproject.toml ([tool.importlinter]): no import goes up a layer.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

fmt: $(STAMP)
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .import_linter_cache .hypothesis bench/work
