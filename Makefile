# docker-net-plugin: see README.md.
GO      ?= go
BIN     := bin/docker-net-plugin
PKGS    := ./...
# The Docker engine the integration tests, the demo and the benchmarks run:
# 20.10 (Debian 12's docker.io), 26.1 (trixie's) or 28.5 (sid's), e.g.
# `make test DOCKER=28.5`. Empty: the harness default (20.10).
DOCKER  ?=
export DNP_DOCKER := $(DOCKER)

.PHONY: all build plugin plugin-push deps test unit vet demo bench clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/docker-net-plugin

# Installs Debian packages and builds Consul once (needs root).
deps:
	bash scripts/install-deps.sh

vet:
	$(GO) vet $(PKGS)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

# Everything: unit tests, store conformance against real servers, and the
# integration tests against real dockerd hosts. Needs root.
test: deps vet
	$(GO) test -count=1 -timeout 25m $(PKGS)

# Only what needs no root and no servers.
unit:
	$(GO) test -count=1 -short $(PKGS)

# The managed plugin directory bin/plugin (config.json + rootfs/). Set
# CREATE=1 to also run docker plugin create $(PLUGIN_NAME) (DOCKER_HOST is
# honoured); see scripts/build-plugin.sh.
PLUGIN_NAME ?= dnp:latest
# The scripts' DOCKER is the docker CLI, not this Makefile's engine version.
DOCKER_CLI ?= docker
plugin:
	PLUGIN_DIR=bin/plugin PLUGIN_NAME=$(PLUGIN_NAME) DOCKER=$(DOCKER_CLI) bash scripts/build-plugin.sh $(if $(CREATE),--create)

# Publishes the managed plugin: the Dockerfile's image (FROM scratch +
# bin/plugin/rootfs) as plugin PLUGIN_REF, pushed to its registry, e.g.
# make plugin-push PLUGIN_REF=registry.example.com:5000/dnp:1.0 (see
# docs/registry.md; DOCKER_HOST is honoured).
plugin-push: plugin
	@test -n "$(PLUGIN_REF)" || { echo "plugin-push: set PLUGIN_REF=REGISTRY/NAME:TAG"; exit 2; }
	PLUGIN_DIR=bin/plugin DOCKER=$(DOCKER_CLI) bash scripts/push-plugin.sh $(PLUGIN_REF)

# Docker hosts in network namespaces on this machine, the plugin installed
# as a managed plugin in each; containers ping across hosts. Needs root.
demo: deps plugin
	$(GO) run ./cmd/dnp-demo -plugin-dir bin/plugin

bench: deps build
	bash scripts/bench.sh

clean:
	rm -rf bin
