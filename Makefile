# One entry point for every chore. `make demo` and `make test` set everything up themselves.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
# This machine's pip configuration names local indexes that may be absent: not our warnings.
QUIET_PIP := 2> >(grep -v '^WARNING: Location' >&2)
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
HAND_WRITTEN := mesh provider operator_service operator_engine pods gateway sdk cli

.PHONY: setup demo demo-paid test gen check-gen lint fmt bench bench-storage bench-paid clean-state kind-e2e

setup: .stamp-system $(VENV)/.stamp node_modules/.stamp

# Debian packages the sandbox needs (root, or sudo when available).
.stamp-system:
	@missing=""; for tool in bwrap slirp4netns nsenter ip setpriv prlimit mkfs.ext4 mount /usr/bin/python3 busybox skopeo umoci; do \
	  command -v $$tool >/dev/null || PATH=$$PATH:/usr/sbin:/sbin command -v $$tool >/dev/null || missing=1; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  $$sudo apt-get update -qq && \
	  $$sudo apt-get install -y -qq bubblewrap slirp4netns iproute2 util-linux mount e2fsprogs python3 busybox-static skopeo umoci >/dev/null; \
	fi
	@touch $@

$(VENV)/.stamp: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "Python 3.11 or newer is needed as $(PYTHON)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip $(QUIET_PIP)
	@$(PY) -m pip install -q -e '.[dev]' $(QUIET_PIP)
	@touch $@

node_modules/.stamp: package.json package-lock.json
	@npm install --no-audit --no-fund --loglevel=error
	@touch $@

demo: setup
	$(VENV)/bin/c2d demo

# The paid flow on a local ganache chain with Ocean's contracts.
demo-paid: setup
	$(VENV)/bin/c2d demo --paid

test: setup
	$(PY) -m pytest

gen: $(VENV)/.stamp
	@PYTHON=$(PY) scripts/gen.sh >/dev/null

# CI fails when the committed gen/ is not what the protos produce.
check-gen: gen
	@git diff --exit-code --stat -- gen || { echo "gen/ is stale: run 'make gen' and commit it"; exit 1; }
	@test -z "$$(git status --porcelain -- gen)" || { echo "gen/ has files git does not track: run 'make gen' and commit them"; exit 1; }

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy
	node_modules/.bin/buf lint

fmt: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) -m bench

# Results storage: upload and download throughput and peak memory of a 512 MiB result, S3 (moto's
# server on 127.0.0.1) beside local disk.
bench-storage: setup
	$(PY) -m bench.storage_throughput

# Paid-order verification per job on a real ganache, beside a chain round trip.
bench-paid: setup
	$(PY) -m bench.paid

# The mesh on a local kind cluster (needs Docker, kind, kubectl): build, deploy, run one job.
kind-e2e: $(VENV)/.stamp
	scripts/kind-e2e.sh
