# One entry point for humans and CI. `make test` is the README's test command.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: venv test unit lint interop demo bench clean

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
	$(BIN)/pytest -m interop -q

# The whole suite: lint, types, unit + contract + interop (the real peers are installed on demand).
test: venv lint
	$(BIN)/pytest -q

# README's first command: reference worker + adapter (standalone) + a streamed chat.
demo: venv
	$(BIN)/python scripts/demo.py

bench: venv
	$(BIN)/python bench/bench_protocol.py
	$(BIN)/python bench/bench_adapter.py

clean:
	rm -rf $(VENV) .peers .pytest_cache .mypy_cache .ruff_cache
