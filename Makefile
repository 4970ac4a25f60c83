# heatcrop: `make run` and `make test` on a fresh machine (Python 3.11 + apt).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= build/model
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup model run test lint bench bench-quality bench-speed apt-deps clean distclean

# System packages the tests and `make run` use (Debian). As root, or through sudo.
APT_PACKAGES := redis-server chromium wrk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
apt-deps:
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(APT_PACKAGES)

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

# Until the edge (nginx + Thumbor) lands, `make run` crops the demo photos with the CLI and
# writes debug overlays next to them in build/run/.
DEMO := demo/images
run: setup
	$(BIN)/python -m sidecar.demo --root $(DEMO) >/dev/null
	mkdir -p build/run
	for photo in $$(cd $(DEMO) && find . -name '*.jpg' | sort); do \
	    name=$$(basename $$photo .jpg); \
	    $(BIN)/heatcrop crop $(DEMO)/$$photo --size 400x300 \
	        --debug build/run/$$name-debug.png --out build/run/$$name-400x300.jpg || exit 1; \
	done
	@echo "crops and debug overlays in build/run/"

test: setup
	@command -v redis-server >/dev/null && command -v chromium >/dev/null || $(MAKE) apt-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: bench-speed bench-quality

bench-speed: setup
	$(BIN)/python -m bench.speed --out bench/results/speed.md

# Also writes the picture gallery (12 dev photos, several aspects) to build/gallery/index.html.
bench-quality: setup
	$(BIN)/python -m bench.quality --out bench/results/quality.md
	$(BIN)/python -m bench.gallery --out build/gallery

clean:
	rm -rf build .pytest_cache

distclean: clean
	rm -rf $(VENV)
