# Salient: `make demo` runs the pipeline on the embedded demo world; `make test` runs the test suite.
# Both create .venv when it is missing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.salient-installed

# Local-run defaults (design.md §4).
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: demo test test-slow bench rehearsal install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/salient demo --out demo-out

# The browser tests drive Debian's chromium through its chromium-driver; they are installed when missing.
test: $(STAMP)
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "make test: the browser tests need /usr/bin/chromium and /usr/bin/chromedriver;" \
	      "install them with: sudo apt-get install -y chromium chromium-driver" >&2; \
	  fi; \
	fi
	$(BIN)/python -m pytest -q --durations=15 -m "not heavy"

# Fault injection on whole builds (S3 outage, failing requests, unwritable output), builds on a
# 3-node and on an autoscaling Ray cluster, and the full demo with its sensitivity claim.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15 -m heavy

bench: $(STAMP)
	$(BIN)/python -m benchmarks.listing
	$(BIN)/python -m benchmarks.activations
	$(BIN)/python -m benchmarks.aggregate
	$(BIN)/python -m benchmarks.masks
	$(BIN)/python -m benchmarks.scale
	$(BIN)/python -m benchmarks.stages
	$(BIN)/python -m benchmarks.pipeline

# The wheels `python -m benchmarks.gpu` needs besides torch, torchvision, numpy, pillow and pyarrow, at
# this .venv's versions, for CPython $(GPU_PYTHON) on x86-64 Linux, into .gpu-wheels/ (at most 40 MiB):
# copy them to a GPU machine without network (docs/benchmarks.md#on-a-gpu).
GPU_PYTHON ?= 3.12

.PHONY: gpu-wheels
gpu-wheels: $(STAMP)
	rm -rf .gpu-wheels
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d .gpu-wheels $$($(BIN)/python -m benchmarks.gpu --wheel-list)
	@bytes=$$(cat .gpu-wheels/*.whl | wc -c); \
	echo ".gpu-wheels/: $$(ls .gpu-wheels | wc -l) wheels for CPython $(GPU_PYTHON), $$((bytes / 1024)) KiB"; \
	if [ $$bytes -gt 41943040 ]; then echo "make gpu-wheels: $$((bytes / 1048576)) MiB, over the 40 MiB budget" >&2; exit 1; fi

# ImageNet's counts on this machine: 1,000 classes x 130 images, 5,000 pairs, three `salient run`s
# (about 30 minutes; docs/benchmarks.md). Not part of `make bench`.
rehearsal: $(STAMP)
	$(BIN)/python -m benchmarks.rehearsal

clean:
	rm -rf demo-out .pytest_cache
