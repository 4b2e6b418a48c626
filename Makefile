# The two commands of the README: `make demo` (set up and run the sample night) and `make test`;
# `make unit` runs the tests that need no service (no RabbitMQ, PostgreSQL, XRootD or Chromium).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# Python 3.11 or newer: the first of these that exists.
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
	command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && { echo $$p; break; }; \
	done)

.PHONY: demo test unit venv services lint bench bench-scale night chaos chaos-cluster clean

$(VENV)/.installed: pyproject.toml
	@test -n "$(PYTHON)" || { echo "Spool needs Python 3.11 or newer (apt-get install python3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

services:
	bash .ci/services.sh rabbitmq xrootd

demo: venv services
	$(VENV)/bin/spool --config config/spool.toml demo

# Two workers (pytest-xdist): most tests wait on the broker, a database or a process, not a core.
# Each test module runs whole in one worker, the cluster's modules all in one (tests/conftest.py).
test: venv
	bash .ci/services.sh rabbitmq postgres chromium xrootd
	$(VENV)/bin/pytest -q --durations=20 -n 2

unit: venv
	$(VENV)/bin/pytest -q -m "not integration"

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy common daemons bench

bench: venv services
	$(PY) bench/ingest.py

# One instance against two of ingest and of the replicator on PostgreSQL, SQLite ingest, and how two
# share a backlog (bench/scale.py, docs/benchmarks.md): 20,000 files a phase, two rounds.
bench-scale: venv
	bash .ci/services.sh rabbitmq postgres
	$(PY) bench/scale.py --json

# The whole night (bench/night.py): 500,000 files, sizes / 1,000 (~130 GB), through every daemon.
night: venv services
	$(PY) bench/night.py

# Long chaos runs (docs/chaos.md): 20,000 files through SIGKILLs, SIGTERMs and outages of a
# private RabbitMQ node, on SQLite then on a fresh PostgreSQL database; ~25 minutes on 2 cores.
chaos: venv
	bash .ci/services.sh rabbitmq postgres
	$(PY) -m bench.chaos --catalogue both

# The several-node chaos run (docs/chaos.md#several-nodes): 5,000 files, every daemon twice, on the
# three-node RabbitMQ cluster (a vhost of the run's own) and a fresh PostgreSQL database; one
# broker node SIGKILLed and started again, one instance of each daemon SIGKILLed.
chaos-cluster: venv
	bash .ci/services.sh rabbitmq postgres rabbitmq-cluster
	$(PY) -m bench.chaos --cluster

clean:
	rm -rf var
