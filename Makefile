# One entry point for people and CI. `make demo` and `make test` each install what they need first.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install demo test lint bench

install:
	$(PIP) install -q -e ".[dev]"

demo: install
	dist-seg demo

test: install
	$(PYTHON) -m pytest -q

lint:
	$(PYTHON) -m ruff check dist_seg tests tools recipes
