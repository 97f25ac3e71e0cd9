# rnnserve: `make run` trains (if needed) and serves; `make test` runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
MODELS ?= models
PORT   ?= 50051
METRICS_PORT ?= 8000
HTTP_PORT ?= 8080
STAMP  := $(VENV)/.installed
# torch==2.13.0 from PyTorch's CPU index: PyPI's own wheel of it is the CUDA build (GBs of
# nvidia-* packages). A CUDA host may point this at e.g. https://download.pytorch.org/whl/cu126.
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu

.PHONY: run test venv proto lint models serve bench clean system-deps triton-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# torch alone first, from the CPU index (pip's configured find-links still apply); resolved
	@# with every extra, or from PyPI, pip takes the CUDA build of the same version (a 5.5 GB
	@# venv, not 1.9 GB). The [train] pin `torch==2.13.0` is then met by 2.13.0+cpu. One retry:
	@# where that index is out of reach, pip's find-links serve it without 5 retries per package
	$(BIN)/python -m pip install --quiet --retries 1 --index-url $(TORCH_INDEX_URL) 'torch==2.13.0'
	$(BIN)/python -m pip install --quiet -e '.[train,serve,client,remote,dev]'
	@# xds-protos (dev: the Envoy config tests) ships an older copy of opentelemetry/proto/*
	@# that may land over opentelemetry-proto's own, depending on install order; put it back
	$(BIN)/python -m pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"
	touch $(STAMP)

# Trains and exports the default model zoo once, then serves it.
models: $(STAMP)
	@if [ ! -f $(MODELS)/.zoo-complete ]; then \
	  echo "== training the default models into $(MODELS)/ (first run only) =="; \
	  $(BIN)/rnn-trainer zoo --out $(MODELS) && touch $(MODELS)/.zoo-complete; \
	fi

run: models
	@echo "== rnn-server: gRPC on localhost:$(PORT), HTTP (OpenAI, KServe) on http://localhost:$(HTTP_PORT),"
	@echo "   metrics on http://localhost:$(METRICS_PORT)/metrics =="
	@echo "   try:  $(BIN)/rnn-client --address localhost:$(PORT) models"
	@echo "         $(BIN)/rnn-client --address localhost:$(PORT) generate --model lstm --prompt 'the time'"
	@echo "         $(BIN)/rnn-client --address localhost:$(PORT) score --model lstm 'the time traveller'"
	@echo "         $(BIN)/grpcurl -plaintext localhost:$(PORT) list"
	$(BIN)/rnn-server --model-repo $(MODELS) --port $(PORT) --http-port $(HTTP_PORT) \
	  --metrics-port $(METRICS_PORT)

# The KServe tests run the real tritonclient from its own venv (triton-venv, below); with
# RNNSERVE_TRITON_PYTHON set they use that interpreter and no venv is made.
test: $(STAMP) $(if $(RNNSERVE_TRITON_PYTHON),,triton-venv)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	RNNSERVE_TRITON_PYTHON="$${RNNSERVE_TRITON_PYTHON:-$(abspath $(TRITON_VENV))/bin/python}" \
	  $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Regenerates the committed gRPC stubs of every proto/rnnserve/**/*.proto with the pinned
# generator (pyproject's `protoc` extra); tests fail when they are stale.
proto: $(STAMP)
	$(BIN)/python proto/generate.py

bench: models
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/forecast.py
	$(BIN)/python bench/serve.py
	$(BIN)/python bench/load.py

# tritonclient[grpc] pins protobuf < 7 (the server's grpcio-health-checking needs >= 7.35): the
# KServe tests run it from its own venv, as a user's separate client would be.
# RNNSERVE_TRITON_PYTHON=<python> makes the tests use another interpreter (e.g. .venv/bin/python
# once one environment can hold both).
TRITON_VENV ?= $(VENV)/triton-client
triton-venv: $(TRITON_VENV)/.installed

$(TRITON_VENV)/.installed:
	test -x $(TRITON_VENV)/bin/python || $(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet 'tritonclient[http,grpc]' numpy
	touch $@

# Tools the end-to-end tests use that do not come from PyPI (Prometheus, promtool).
system-deps:
	@# Debian packages some tests use (CI fails a test whose tool is missing; elsewhere it skips):
	@# prometheus (promtool, the scrape test), nodejs + npm (the Node.js client test), curl
	@# (the HTTP examples as a user types them)
	@missing=""; \
	command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	else echo "not installed and not root:$$missing (their tests will be skipped)"; fi
	@command -v kubectl >/dev/null 2>&1 || echo "kubectl not installed (not in Debian's main archive): its kustomize test will be skipped, or fail under CI"

clean:
	rm -rf $(VENV) build *.egg-info
