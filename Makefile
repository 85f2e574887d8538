# kpm33b-proxy developer and operator commands. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The container test runs podman as root.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: help deps demo run status test test-container lint bench install uninstall clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/'

deps: $(STAMP) ## install Mosquitto (apt) and the Python environment in .venv/

$(STAMP): requirements.txt requirements-dev.txt scripts/install-deps.sh
	bash scripts/install-deps.sh "$(PYTHON)" "$(VENV)"
	touch $(STAMP)

demo: deps ## brokers, both daemons and simulated meters; shows the clean messages
	$(PY) tools/run_local.py --demo

run: deps ## brokers and both daemons for real meters (no simulator)
	$(PY) tools/run_local.py

# `make status` reads the system `make demo` or `make run` started (their run/config.yaml), unless
# KPM33B_CONFIG names a configuration; ARGS= passes options on, e.g. ARGS="--json --meter 33B1225950027".
STATUS_CONFIG := $(if $(KPM33B_CONFIG),,$(if $(wildcard run/config.yaml),--config run/config.yaml))

status: deps ## the bridge and every meter from the central broker's retained topics (ARGS="--json --meter ID")
	$(PY) kpm33b_status.py $(STATUS_CONFIG) $(ARGS)

test: deps ## lint and the whole test suite, integration tests included
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

test-container: deps ## build the image, run compose.yaml on podman, check it end to end, take it all down
	bash container/install-tools.sh
	$(SUDO) $(PY) -m pytest -p no:cacheprovider -o tmp_path_retention_policy=none -s container/test_compose.py

bench: deps ## performance: proxy vs bare paho forwarder vs Mosquitto bridge, latency, memory, config_sender
	$(PY) bench/run.py

lint: deps ## ruff only
	$(VENV)/bin/ruff check .

install: ## install into /opt/kpm33b-proxy and systemd (DESTDIR= for a staging root)
	DESTDIR="$(DESTDIR)" bash scripts/install.sh install

uninstall: ## remove what install added (keeps /etc/kpm33b)
	DESTDIR="$(DESTDIR)" bash scripts/install.sh uninstall

clean: ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
