# Atelier: one GPU, one Discord community, one command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
EXTRAS ?= test,safety,postgres,ray
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install system-deps run demo test test-fast test-upscalers bench lint format audit tiny-model clean

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
	$(MAKE) test-upscalers

# The optional ESRGAN upscaler (spandrel) imports torchvision, and the package index has no
# torchvision that loads beside the CPU torch pinned above (its builds are CUDA builds, which need
# a CUDA torch). So the upscaler's tests run with a matching pair laid over the venv in a folder of
# its own (the CUDA build of torch 2.14.1 + torchvision 0.29.1, run on the CPU; 2.9.1 + 0.24.1, a
# CPU build, on aarch64), every other package at the venv's pins. It is what an operator installs
# with `pip install '.[upscalers]'` beside their CUDA torch.
UPSCALERS := .venv-upscalers
UPSCALER_TORCH := $(if $(filter aarch64,$(shell uname -m)),torch==2.9.1 torchvision==0.24.1,torch==2.14.1 torchvision==0.29.1)

$(UPSCALERS)/.installed: $(VENV)/.installed constraints.txt
	rm -rf $(UPSCALERS)
	mkdir -p $(UPSCALERS)
	grep -v '^torch==' constraints.txt > $(UPSCALERS)/constraints.txt
	$(BIN)/pip install --quiet --target $(UPSCALERS)/site -c $(UPSCALERS)/constraints.txt $(UPSCALER_TORCH) spandrel
	touch $@

test-upscalers: $(UPSCALERS)/.installed
	PYTHONPATH=$(UPSCALERS)/site $(BIN)/pytest -p no:cacheprovider tests/engine/test_esrgan.py tests/engine/test_upscale.py \
		tests/bench/test_gpu_bench_cpu.py

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
	rm -rf $(VENV) $(UPSCALERS) demo-out .pytest_cache
