# Two entry points (see README): `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo

.PHONY: setup demo test bench-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Export the demo model (fp32 + int8), print its parity table, then answer two held-out images.
demo: setup
	$(BIN)/pgexport onnx --int8 -o $(DEMO_OUT) --force
	$(BIN)/python -m pgexport.demo.ask $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf out .pytest_cache
