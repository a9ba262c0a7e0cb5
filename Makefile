# raftkv — common tasks. `make test` works on a fresh machine with only Python:
# it creates .venv and installs the project with its dev extra first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SEEDS  ?= 1000
FIRST_SEED ?= 0
PYTEST_ARGS ?=
# The cluster token: one per cluster, made on its first `make run` / `make up` in
# .cluster-token (mode 0600, ignored by git) and given to the nodes; nothing in the
# repository holds a token.
TOKEN_FILE := .cluster-token

.PHONY: help venv test lint typecheck unit sim run cluster clean-venv cluster-token \
	wheels image up down logs ps clean test-docker docker-host bench bench-storage profile faults \
	tls-init nginx-image

help:
	@echo "make run        start a 3-node cluster (docker if available, else local processes)"
	@echo "make run TLS=1  the docker cluster with auth and an nginx TLS proxy per node (HTTPS on 127.0.0.1:8443..8445)"
	@echo "make test       lint, type-check and run the test suite"
	@echo "make sim SEEDS=N [FIRST_SEED=F]   run N simulator seeds from F (RAFTKV_SIM_SEED=s replays one)"
	@echo "make up | down | logs | ps   the docker-compose cluster: start detached, stop, follow, list"
	@echo "make clean      remove the docker cluster WITH its volumes (all its data) and wheels/"
	@echo "make image      build the image (make wheels: the wheelhouse it is built from)"
	@echo "make test-docker   build the image and run the docker-compose test"
	@echo "make docker-host   (root) install and start a Docker engine if need be; print the base image"
	@echo "make bench [ARGS='--compare etcd']   write throughput of a fresh local cluster (JSON + PNG in benchmarks/results/)"
	@echo "make bench-storage   synced appends/s, commits at once (1 and 3 processes), snapshot save/load times"
	@echo "make profile [ARGS='--point put/leader/c16 --seconds 20']   py-spy of every process of a leader and a follower under load"
	@echo "make faults SECONDS=300 SEED=n [NODES=5 MIX=all|kills|partitions|pauses|restarts WORKLOAD=register|locks SECURE=1]   a long fault-injection run (SECURE=1: peer TLS + auth; as root it apt-installs nftables/iptables for the partitions)"

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

typecheck: $(STAMP)
	$(PY) -m mypy --strict raftkv storage snapshots tests

unit: $(STAMP)
	$(PY) -m pytest -q -m "not docker" $(PYTEST_ARGS)

test: lint typecheck
	RAFTKV_SIM_SEEDS=$(SEEDS) $(PY) -m pytest -q -m "not docker" $(PYTEST_ARGS)

run:
	@if [ "$(TLS)" = 1 ] && ! docker info >/dev/null 2>&1; then \
	  echo "make run TLS=1: needs a Docker engine (docker info failed): see make docker-host"; exit 1; fi
	@if docker info >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory up && \
	  echo "make run: following the logs; Ctrl-C stops following, the cluster keeps running (make down stops it)" && \
	  $(COMPOSE) logs --follow; \
	else \
	  echo "make run: no Docker engine answers (docker info failed): running the 3-node cluster as local processes"; \
	  $(MAKE) --no-print-directory cluster; \
	fi

cluster: $(STAMP) $(TOKEN_FILE)
	RAFTKV_CLUSTER_TOKEN_FILE=$(TOKEN_FILE) $(PY) -m raftkv cluster --nodes 3

sim: $(STAMP)
	RAFTKV_SIM_SEEDS=$(SEEDS) RAFTKV_SIM_FIRST_SEED=$(FIRST_SEED) $(PY) -m pytest -q -m sim tests/sim $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# ---------------------------------------------------------------------------- benchmarks
ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.write_throughput $(ARGS)

bench-storage: $(STAMP)
	$(PY) -m benchmarks.bench_storage $(ARGS)

profile: $(BENCH_STAMP)
	$(PY) -m benchmarks.profile_node $(ARGS)

# ---------------------------------------------------------------------------- fault injection
SECONDS ?= 300
SEED    ?= 1
NODES   ?= 3
MIX     ?= all
WORKLOAD ?= register
SECURE  ?=

# The partition faults need nftables or iptables: as root with apt, the setup script installs
# them (no service started); otherwise it says why the run will skip those faults.
faults: $(STAMP)
	@bash tests/faults/setup_firewall.sh
	$(PY) -m tests.faults.run --seconds $(SECONDS) --seed $(SEED) --nodes $(NODES) --mix $(MIX) \
	  --workload $(WORKLOAD) $(if $(filter 1,$(SECURE)),--secure) \
	  --results results/faults/$(WORKLOAD)$(if $(filter 1,$(SECURE)),-secure)-seed-$(SEED)

# ---------------------------------------------------------------------------- docker
# The image is built offline (no registry, no network in `docker build`) from wheels/: a
# wheelhouse made here for the base image's Python version and platform.
DOCKER_SETUP  := scripts/docker-host-setup.sh
UPSTREAM_BASE := python:3.12-slim
RAFTKV_IMAGE  ?= raftkv:latest
COMPOSE_PROJECT ?= raftkv
export RAFTKV_IMAGE
# BASE_IMAGE from the environment wins; else python:3.12-slim if present; else what
# scripts/docker-host-setup.sh answers (as root it also installs and starts the engine and,
# with no registry in reach, builds a local Debian + python3 base); computed once, when needed.
BASE_IMAGE ?= $(eval BASE_IMAGE := $(or $(shell \
	if docker image inspect $(UPSTREAM_BASE) >/dev/null 2>&1; then echo $(UPSTREAM_BASE); \
	else bash $(DOCKER_SETUP); fi),$(UPSTREAM_BASE)))$(BASE_IMAGE)
COMPOSE_CMD = $(eval COMPOSE_CMD := $(shell docker compose version >/dev/null 2>&1 \
	&& echo "docker compose" || echo docker-compose))$(COMPOSE_CMD)
# TLS=1: the TLS variant (docker-compose.tls.yml over docker-compose.yml): auth with the root
# token in $(TLS_DIR)/root.token, one nginx TLS proxy per node; its own project, containers
# (raftkv-tls-*) and volumes, so it never meets the data of the plain cluster.
TLS ?=
TLS_DIR ?= data/tls
ifeq ($(TLS),1)
COMPOSE_PROJECT := raftkv-tls
COMPOSE_FILES := -f docker-compose.yml -f docker-compose.tls.yml
export RAFTKV_CONTAINER_PREFIX := raftkv-tls
export RAFTKV_TLS_DIR := $(abspath $(TLS_DIR))
UP_NEEDS := tls-init nginx-image
else
COMPOSE_FILES := -f docker-compose.yml
UP_NEEDS :=
endif
COMPOSE = RAFTKV_CLUSTER_TOKEN="$${RAFTKV_CLUSTER_TOKEN:-$$(cat $(TOKEN_FILE) 2>/dev/null)}" \
	$(COMPOSE_CMD) -p $(COMPOSE_PROJECT) $(COMPOSE_FILES)
ARCH := $(shell uname -m)

docker-host:
	bash $(DOCKER_SETUP)

wheels: $(STAMP)
	@base=$(BASE_IMAGE); \
	docker info >/dev/null 2>&1 || { echo "make $@: no Docker engine answers (docker info failed)"; exit 1; }; \
	pyv=$$(docker run --rm --entrypoint python3 $$base -c \
	  'import sys; print("%d.%d" % sys.version_info[:2])') || { \
	  echo "make $@: cannot run $$base to learn its Python version"; exit 1; }; \
	echo "make $@: wheels/ for $$base (Python $$pyv, $(ARCH))"; \
	rm -rf wheels build && mkdir wheels && \
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir wheels . && \
	$(PY) -m pip download --quiet --only-binary=:all: --python-version $$pyv \
	  --platform manylinux2014_$(ARCH) --platform manylinux_2_28_$(ARCH) \
	  --dest wheels wheels/raftkv-*.whl

image: wheels
	docker build --network none --build-arg BASE_IMAGE=$(BASE_IMAGE) --tag $(RAFTKV_IMAGE) .

$(TOKEN_FILE): $(STAMP)
	$(VENV)/bin/raftkv token generate --file $(TOKEN_FILE)

cluster-token: $(TOKEN_FILE)

up: image $(TOKEN_FILE) $(UP_NEEDS)
	$(COMPOSE) up --detach
	@echo "make up: HTTP on 127.0.0.1:$${RAFTKV_HTTP_PORT_1:-4001}, $${RAFTKV_HTTP_PORT_2:-4002}, $${RAFTKV_HTTP_PORT_3:-4003}; make logs | ps | down (keeps the data) | clean (deletes it)"
	@if [ "$(TLS)" = 1 ]; then echo "make up: HTTPS (client certificate required) on 127.0.0.1:8443..8445; certificates and the root token in $(TLS_DIR)"; fi

# The CA, node and client certificates (raftkv certs init) and a root token, once.
tls-init: $(STAMP)
	@if [ -e $(TLS_DIR)/ca.pem ]; then echo "make tls-init: $(TLS_DIR) has its certificates already"; else \
	  mkdir -p $(TLS_DIR) && chmod 0700 $(TLS_DIR) && \
	  $(PY) -m raftkv certs init $(TLS_DIR) --nodes n1,n2,n3 && \
	  $(PY) -c 'import secrets; print(secrets.token_hex(32))' > $(TLS_DIR)/root.token && \
	  chmod 0644 $(TLS_DIR)/root.token && \
	  echo "make tls-init: root token in $(TLS_DIR)/root.token (the directory is 0700; the file is readable by the nodes' container user)"; fi

# The proxies' image: Debian's nginx-light, built offline-capable with mmdebstrap.
nginx-image:
	bash scripts/nginx-image.sh >/dev/null

down:
	$(COMPOSE) down

logs:
	$(COMPOSE) logs --follow

ps:
	$(COMPOSE) ps

clean:
	@if docker info >/dev/null 2>&1; then \
	  $(COMPOSE) down --volumes --remove-orphans && \
	  echo "make clean: removed the docker cluster's containers, network AND volumes (its data)"; \
	else echo "make clean: no Docker engine answers: no containers or volumes removed"; fi
	rm -rf wheels build

# The image is built first where an engine answers (finding BASE_IMAGE may start one);
# elsewhere the test itself skips, or fails under RAFTKV_DOCKER_TESTS=1 (CI).
test-docker: $(STAMP)
	@base=$(BASE_IMAGE); if docker info >/dev/null 2>&1; then \
	  $(MAKE) --no-print-directory image BASE_IMAGE=$$base; \
	else echo "make test-docker: no Docker engine answers: no image built"; fi
	$(PY) -m pytest -q -m docker tests/docker $(PYTEST_ARGS)
