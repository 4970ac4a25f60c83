# heatcrop: `make run` and `make test` on a fresh machine (Python 3.11 + apt).
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
MODEL_DIR ?= build/model
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup model thumbor cluster run test lint docs bench bench-quality bench-speed bench-load apt-deps clean distclean

# System packages the tests and `make run` use (Debian). As root, or through sudo.
APT_PACKAGES := redis-server chromium wrk nginx libnginx-mod-http-js
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
# Its INT8 twin is quantized with the committed ranges (engines/int8_calibration.json).
# The face detector (YuNet-n) is written from the committed engines/yunet/yunet_n_dynamic.onnx
# (Apache-2.0, pinned by sha256 in engines/faces.py): nothing is fetched.
model: $(STAMP)
	$(BIN)/python -m engines.export --out $(MODEL_DIR)
	$(BIN)/python -m engines.quantize build --model-dir $(MODEL_DIR)
	$(BIN)/python -m engines.faces_build --out $(MODEL_DIR)

# Thumbor, the legacy image server of `make run` and the edge tests, in its own environment:
# it needs Pillow < 13 and .venv has 13. Exact pins: pyproject.toml's `legacy` extra.
THUMBOR_VENV ?= .venv-thumbor
THUMBOR_STAMP := $(THUMBOR_VENV)/.installed
thumbor: $(THUMBOR_STAMP)

$(THUMBOR_STAMP): pyproject.toml
	test -x $(THUMBOR_VENV)/bin/python || $(PY) -m venv $(THUMBOR_VENV)
	$(THUMBOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(THUMBOR_VENV)/bin/python -m pip install --quiet $$($(PY) -c 'import tomllib; \
	    print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["legacy"]))')
	touch $@

# The cluster extra (Ray Data, pinned in pyproject.toml) for `heatcrop backfill` and its tests
# (tests/cluster/); `make run` does without it, and the sidecar never imports it.
CLUSTER_STAMP := $(VENV)/.cluster-installed
cluster: $(CLUSTER_STAMP)

$(CLUSTER_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[build,dev,cluster]'
	touch $@

# nginx + sidecar + Thumbor on loopback with the demo photos; prints the URLs; Ctrl-C stops all.
run: setup thumbor
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || $(MAKE) apt-deps
	$(BIN)/python -m nginx.stack

test: setup thumbor cluster
	@command -v redis-server >/dev/null && command -v chromium >/dev/null \
	    && command -v wrk >/dev/null && test -x /usr/sbin/nginx \
	    && test -f /usr/lib/nginx/modules/ngx_http_js_module.so || $(MAKE) apt-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The settings reference of docs/configuration.md, generated from sidecar/settings.py (a test
# fails when the committed page differs): run after changing a setting.
docs: $(STAMP)
	$(BIN)/python -m sidecar.settings_doc --write docs/configuration.md

# TensorRT plans for this machine's GPU: builds what is missing or stale, keeps the rest.
# Needs the driver, TensorRT and pycuda (docs/gpu.md); e.g. ENGINES_ARGS="--precision int8
# --calib-dir ../shared/eval/fcdb_dev/images".
.PHONY: engines
engines: setup
	$(BIN)/python -m engines.build_trt --model-dir $(MODEL_DIR) --out build/engines $(ENGINES_ARGS)

bench: bench-speed bench-quality

# bench.cost: the cold cost against libvips attention as an image server runs it, one request
# at a time and at saturation (about 10 minutes); bench.speed: the crop core's parts.
bench-speed: setup
	$(BIN)/python -m bench.cost --out bench/results/cost.md
	$(BIN)/python -m bench.speed --out bench/results/speed.md

# nginx + sidecar + Thumbor under wrk (and a static stand-in legacy); a few minutes.
bench-load: setup thumbor
	$(BIN)/python -m bench.load --out bench/results/load.md

# Also writes the picture gallery (12 dev photos, several aspects) to build/gallery/index.html.
bench-quality: setup
	$(BIN)/python -m bench.quality --out bench/results/quality.md
	$(BIN)/python -m bench.gallery --out build/gallery

clean:
	rm -rf build .pytest_cache

distclean: clean
	rm -rf $(VENV) $(THUMBOR_VENV)
