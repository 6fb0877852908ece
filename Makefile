PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 resolves to the CPU wheel on disk; any other spelling pulls CUDA wheels.
TORCH := torch==2.13.0
# tests/test_web_demo.py drives the system Chromium through Playwright (never `playwright install`).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test mutants setup setup-test clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)

setup: $(BIN)/python
	$(BIN)/pip install -q -e .

$(CHROMIUM):
	$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium

setup-test: $(BIN)/python $(CHROMIUM)
	$(BIN)/pip install -q -e ".[test]"
	# transformers.js for tests/test_export.py; its onnxruntime-node ships its CPU binaries, and
	# --ignore-scripts skips the postinstall that fetches GPU ones from the network
	cd tests/js && npm install --silent --no-audit --no-fund --ignore-scripts

demo: setup
	$(BIN)/palikit demo $(if $(IMAGE),--image $(IMAGE)) --out demo_out

test: setup-test
	$(BIN)/python -m pytest

# Each bug of tests/mutants/, put in on purpose, must make its tests fail (tools/mutants.py):
# all of them, or as many as BUDGET seconds allow (CI), in an order that rotates with each commit.
mutants: setup-test
	$(BIN)/python tools/mutants.py $(if $(BUDGET),--budget $(BUDGET))

clean:
	rm -rf $(VENV) demo_out
