# One Makefile, one tool: every verb runs through uv and the committed lock file.
SHELL := /bin/bash
.DEFAULT_GOAL := all

UV := $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := python3 -m uv
endif

.PHONY: all install run test drills lint format bench bench-tools soak image chart clean tools dashboard dashboard-image

## tools: make sure uv, redis-server and promtool (which checks the chart's alert rules) exist on a fresh machine.
tools:
	@$(UV) --version >/dev/null 2>&1 || python3 -m pip install --quiet uv
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server not found: installing it from Debian's packages"; \
		apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
	@command -v promtool >/dev/null 2>&1 || { \
		echo "promtool not found: installing Debian's prometheus package, which ships it"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

## install: the locked virtualenv in .venv, dev tools included.
install: tools
	$(UV) sync --frozen

## run: the whole pipeline locally on embedded defaults (see README).
run: install
	$(UV) run --frozen smartcar-ingest dev

## test: the in-process and process tests (tests/kinds.py), in parallel, with about 100 Hypothesis examples each.
## TEST_PROCESSES sets how many test processes run at once (most tests wait on Redis or a child process).
TEST_PROCESSES ?= 4
test: install
	$(UV) run --frozen pytest -n $(TEST_PROCESSES) -m "not drill"

## drills: the drills (kills, Redis restarts, outages, OOM, long settles) and every Hypothesis test at its
## full example count. CI runs them after `make test`.
DRILL_PROCESSES ?= 2
drills: install
	TEST_FULL_EXAMPLES=1 $(UV) run --frozen pytest -n $(DRILL_PROCESSES) -m "drill or hypothesis" -rA

## lint: ruff (rules and format) and strict mypy.
lint: install
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .
	$(UV) run --frozen mypy

format: install
	$(UV) run --frozen ruff format .
	$(UV) run --frozen ruff check --fix .

## bench-tools: the load generator the ingest benchmark drives (wrk), from Debian's packages.
bench-tools:
	@command -v wrk >/dev/null 2>&1 || { \
		echo "wrk not found: installing it from Debian's packages"; \
		apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }

## bench: benchmarks with their baselines side by side.
bench: install bench-tools
	$(UV) run --frozen python -m bench

## soak: ten minutes of traffic while workers and Redis are killed and restarted, reporting
## acknowledged, published, duplicates and worker memory (docs/reliability.md). Not run by `make test`.
soak: install
	$(UV) run --frozen python -m bench.soak

## image: the container image. Needs a Docker engine with BuildKit; `make test` lints the
## Dockerfile with hadolint instead, since CI has no engine.
IMAGE ?= smartcar-ingest:dev
image:
	@command -v docker >/dev/null 2>&1 || { echo "make image needs a Docker engine (docker build with BuildKit)"; exit 1; }
	docker build -t $(IMAGE) .

## dashboard: rq-dashboard on http://127.0.0.1:$(DASHBOARD_PORT) over REDIS_URL (environment or .env, else the
## local default), reading the jobs as JSON, with deleting turned off. The URL goes through the environment, never argv.
DASHBOARD_PORT ?= 9181
dashboard: install
	@RQ_DASHBOARD_REDIS_URL="$$($(UV) run --frozen python -c 'from core.config import Settings; print(Settings().redis_url)')" \
		$(UV) run --frozen rq-dashboard --bind 127.0.0.1 --port $(DASHBOARD_PORT) --json --disable-delete

## dashboard-image: the image the chart's optional rq-dashboard runs (Dockerfile.dashboard; docs/deploy.md).
DASHBOARD_IMAGE ?= smartcar-ingest-dashboard:dev
dashboard-image:
	@command -v docker >/dev/null 2>&1 || { echo "make dashboard-image needs a Docker engine (docker build with BuildKit)"; exit 1; }
	docker build -f Dockerfile.dashboard -t $(DASHBOARD_IMAGE) .

## chart: lint, render and validate the Helm chart offline, and lint the Dockerfile (tests/test_deploy.py).
chart: install
	$(UV) run --frozen pytest tests/test_deploy.py

all: lint test

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache .hypothesis
