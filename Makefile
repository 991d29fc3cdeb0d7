# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv and install
# CPU torch first where no CUDA GPU is present (a plain `pip install torch` would pull ~3 GB of CUDA wheels).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
# e.g. TORCH_PIP_ARGS="--index-url <your CPU wheel index>" where PyPI's default build is a CUDA one
TORCH_PIP_ARGS ?=

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA GPU found: installing the default torch build"; \
	else \
		echo "no CUDA GPU: installing the CPU torch wheel first"; \
		$(PY) -m pip install -q torch==$(TORCH_VERSION) $(TORCH_PIP_ARGS); \
	fi
	$(PY) -m pip install -q -e ".[dev,ray]"
	DS_BUILD_OPS=0 $(PY) -m pip install -q "deepspeed>=0.16"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) -m launcher demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.run_all

clean:
	rm -rf $(VENV) examples/tiny-model examples/outputs
