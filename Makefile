# One entry point for humans and CI. `make test` is the README's test command.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test unit lint interop e2e browser demo demo-app bench clean

$(BIN)/fastchat-adapter: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/fastchat-adapter

lint: venv
	$(BIN)/ruff check protocol adapter tests bench scripts
	$(BIN)/ruff format --check protocol adapter tests bench scripts
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest -m "not interop" -q

interop: venv
	$(BIN)/pytest -m "interop and not e2e" -q

# DB-GPT's app (webserver + web UI) on FastChat workers, in headless Chromium (tests/interop/e2e).
e2e: venv browser
	$(BIN)/pytest -m e2e -q

# Debian's chromium + chromedriver for the e2e suite (apt-get; needs root; no-op when present).
browser:
	bash scripts/install_browser.sh

# The whole suite: lint, types, unit + contract + interop + e2e (the real peers and the browser are
# installed on demand).
test: venv lint browser
	$(BIN)/pytest -q

# README's first command: reference worker + adapter (standalone) + a streamed chat.
demo: venv
	$(BIN)/python scripts/demo.py

# DB-GPT's own app (web UI) on a reference worker through the adapter; prints the URL to open.
demo-app: venv
	$(BIN)/python scripts/demo_app.py

# The adapter as a relay beside the direct path, nginx, FastChat's and DB-GPT's relays (the peers
# from the interop venvs); BENCH_ARGS=--quick for 1 repetition without the 2,000-stream hold.
bench: venv
	$(BIN)/python bench/bench_protocol.py
	$(BIN)/python bench/bench_adapter.py
	$(BIN)/python bench/relay.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .peers .pytest_cache .mypy_cache .ruff_cache
