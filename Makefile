# One entry point for people and CI. Every target creates .venv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
# Extra arguments for `make run`, e.g. make run ARGS="--model deit_tiny_patch16_224"
ARGS    ?=

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install run test test-fast lint bench train-demo eval clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch/torchvision first and pinned: these builds are on local disk here; a bare
	# `torch` requirement could otherwise pull a multi-GB build from the registry.
	$(BIN)/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/python -m pip install -q -e ".[dev,ray,transformers]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m service serve --host $(HOST) --port $(PORT) $(ARGS)

# Three pytest-xdist workers keep the two cores busy while some tests wait on sockets and timers.
# Each module stays on one worker (its server starts once), the longest first (tests/conftest.py); then the tests
# marked `solo` (each bounds a latency or counts a server's CPU) run after them, on two workers, one module
# per core: a solo test is never beside the saturated parallel run, nor beside another test of its module.
# The slowest tests are printed, to keep the time visible.
XDIST   ?= -n 3 --dist loadfile --no-loadscope-reorder
SOLO_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
# the modules holding solo tests: the solo run collects only these (collecting all of them takes seconds)
SOLO    := $(shell grep -l 'mark\.solo' tests/test_*.py)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(XDIST) -m "not solo" --durations=25; parallel=$$?; \
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(SOLO_XDIST) -m solo --durations=5 $(SOLO); alone=$$?; \
	test $$parallel -eq 0 -a $$alone -eq 0

# The unit tests alone: no server, worker, Ray, browser or docker process (markers: tests/conftest.py)
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder --durations=10

# ruff, configured in pyproject.toml [tool.ruff]; no formatter check (the tree is not ruff-formatted)
lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench

train-demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m demo.train

eval: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m demo.evaluate

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
