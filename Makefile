# The two commands a newcomer runs are `make demo` and `make test`; both go through `make install`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser postgres bench-tools demo test lint typecheck clean

# One venv with every extra, pinned by constraints.txt (torch is the CPU wheel on this disk), installed by uv
# from the indexes pip is configured with (tools/install.py; it falls back to pip if uv fails).
$(STAMP): pyproject.toml constraints.txt tools/install.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/install.py $(VENV)
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/slipstream demo

lint: install
	$(BIN)/ruff check src tests benchmarks examples tools
	$(BIN)/ruff format --check src tests benchmarks tools $(wildcard examples/*/*.py)

typecheck: install
	$(BIN)/mypy

# Report and dashboard tests drive Debian's Chromium headless through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "The browser tests need Chromium: run 'sudo apt-get install chromium' (Debian) and retry." >&2; exit 1; \
	  fi; }

# The load generators benchmarks/ drives (wrk for REST, h2load for gRPC), from Debian's packages.
bench-tools:
	@command -v wrk >/dev/null && command -v h2load >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nghttp2-client >/dev/null; \
	  else \
	    echo "The benchmarks need wrk and h2load: run 'sudo apt-get install wrk nghttp2-client' (Debian) and retry." >&2; exit 1; \
	  fi; }

# The PostgreSQL store's tests start a throwaway cluster (tests/pg_support.py) with initdb/pg_ctl from
# Debian's package; they fail (never skip) without it.
# As root the tests run the server as the unprivileged 'postgres' user (the package creates it).
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	  else \
	    echo "The database tests need PostgreSQL: run 'sudo apt-get install postgresql' (Debian) and retry." >&2; exit 1; \
	  fi; }
	@if [ "$$(id -u)" = 0 ] && ! id -u postgres >/dev/null 2>&1; then \
	  useradd --system --home-dir /var/lib/postgresql --shell /usr/sbin/nologin postgres; \
	fi

test: install browser postgres lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
