# heatcrop: `make run` and `make test` on a fresh machine (Python 3.11 + apt).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= build/model
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup model run test lint bench bench-quality bench-speed clean distclean

setup: $(STAMP) model

$(STAMP): pyproject.toml
	command -v $(PY) >/dev/null || { echo "need $(PY)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[build,dev]'
	touch $@

# The ONNX graph is written from the shipped weights; its file name carries a content hash.
model: $(STAMP)
	$(BIN)/python -m engines.export --out $(MODEL_DIR)

run: setup
	$(BIN)/heatcrop crop demo/coffee.jpg --size 400x300 || true

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: bench-speed bench-quality

bench-speed: setup
	$(BIN)/python -m bench.speed --out bench/results/speed.md

bench-quality: setup
	$(BIN)/python -m bench.quality --out bench/results/quality.md

clean:
	rm -rf build .pytest_cache

distclean: clean
	rm -rf $(VENV)
