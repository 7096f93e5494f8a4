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

EVAL_IMAGES := pgexport/demo/data/images

# Export the demo model (fp32 + int8, parity table printed), then answer held-out eval images
# (expected: "blue", then "red triangle and yellow triangle and red circle"; see pgexport/demo/data/eval.jsonl).
demo: setup
	$(BIN)/pgexport onnx --int8 -o $(DEMO_OUT) --force
	$(BIN)/pgexport generate $(DEMO_OUT) --image $(EVAL_IMAGES)/eval_001.png --prompt "what color is the triangle?"
	$(BIN)/pgexport generate $(DEMO_OUT) --image $(EVAL_IMAGES)/eval_000.png --prompt "caption en"
	$(BIN)/pgexport generate $(DEMO_OUT) --image $(EVAL_IMAGES)/eval_004.png --prompt "segment square" --draw $(DEMO_OUT)-segment.png

# Test files run on every core (at most 4 processes; a file stays in one, so its module fixtures are
# made once); the 15 slowest tests are listed at the end. `pytest -m "not slow"` skips the heaviest
# runs for a quick loop.
test: setup
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile --durations 15

clean:
	rm -rf out .pytest_cache
