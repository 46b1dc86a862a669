# Two commands on a fresh machine: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch/torchvision: any recent build works; these two lie on the development machines' disk.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# FAISS build: cpu, or gpu (faiss-gpu-cu12) on a CUDA machine; never both (they share one package folder)
FAISS ?= cpu

.PHONY: demo test test-all install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q -e '.[$(FAISS),test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/geoscout demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m ''

clean:
	rm -rf $(VENV) .pytest_cache
