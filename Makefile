# Atelier: one GPU, one Discord community, one command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= test,safety,postgres,ray
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install system-deps run demo test test-fast bench lint format audit tiny-model clean

install: $(VENV)/.installed

# torch first, pinned: the pin picks the CPU wheel on this kind of machine and the CUDA build
# on a Linux GPU box; an unpinned torch would pull a multi-GB CUDA build anywhere.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e '.[$(EXTRAS)]'
	touch $@

run: install
	$(BIN)/atelier run

demo: install
	$(BIN)/atelier demo

# Debian packages some tests use (chromium + tesseract for the demo screenshot, a PostgreSQL
# server): installed when running as root, otherwise those tests skip with the reason.
system-deps:
	sh scripts/system-deps.sh

test: install system-deps
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python scripts/audit.py
	$(BIN)/pytest

test-fast: install
	$(BIN)/pytest -m 'not slow and not bench'

bench: install
	$(BIN)/pytest -m bench tests/bench -s -p no:cacheprovider

# Known vulnerabilities in the installed packages (pip-audit; passes with a note when its
# advisory database cannot be reached).
audit: install
	$(BIN)/python scripts/audit.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

tiny-model: install
	$(BIN)/atelier tiny-model data/tiny-sdxl

clean:
	rm -rf $(VENV) demo-out .pytest_cache
