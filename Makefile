# docker-net-plugin: see README.md.
GO      ?= go
BIN     := bin/docker-net-plugin
PKGS    := ./...
# The Docker engine of a single run: 20.10 (Debian 12's docker.io), 26.1
# (trixie's) or 28.5 (sid's), e.g. `make test DOCKER=26.1` (everything on
# that engine) or `make test-core DOCKER=20.10`. Without it, `make test`
# runs the matrix: the whole integration suite on DOCKER_NEWEST and the
# core tests on DOCKER_OLDER; the benchmarks use the harness default
# (20.10) and the demo the newest engine installed.
DOCKER        ?=
DOCKER_NEWEST := 28.5
DOCKER_OLDER  := 26.1 20.10
export DNP_DOCKER := $(DOCKER)

# The core integration tests, run on every engine: overlay across hosts,
# IPAM with dockerd, the managed plugin (kill -9; disable, set, enable) and
# swarm; of the tests run per store, only the etcd runs.
CORE_TESTS := ^(TestOverlayAcrossHosts|TestIPAMWithDocker|TestManagedPlugin.*|TestSwarm)$$
CORE_SKIP  := /^(consul|zk)$$

.PHONY: all build plugin plugin-push deps test test-units test-integration test-core test-guest unit vet fuzz demo bench clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN) ./cmd/docker-net-plugin

# Installs Debian packages and builds Consul once (needs root).
deps:
	bash scripts/install-deps.sh

# go vet, staticcheck (pinned in go.mod as a tool) and gofmt.
vet:
	$(GO) vet $(PKGS)
	$(GO) tool staticcheck $(PKGS)
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }

# Everything: unit tests, store conformance against real servers, and the
# integration tests against real dockerd hosts, on the engine matrix (or on
# DOCKER only, when set); then, on their own (the guest is an emulated
# machine: it wants the CPU), the GRE tests in the test guest on Debian's
# kernel (docs/gre-guest.md). Needs root.
ifeq ($(DOCKER),)
test: deps vet test-units
	$(MAKE) --no-print-directory test-integration DOCKER=$(DOCKER_NEWEST)
	$(foreach v,$(DOCKER_OLDER),$(MAKE) --no-print-directory test-core DOCKER=$(v) && ) true
	$(MAKE) --no-print-directory test-guest
else
test: deps vet test-units test-integration test-guest
endif

# Unit tests and store conformance against real servers: no Docker.
test-units:
	$(GO) test -count=1 -timeout 15m $$($(GO) list $(PKGS) | grep -v -e '/integration$$' -e '/guest$$')

# The whole integration suite on engine DOCKER.
test-integration:
	@echo "==> integration suite on Docker $(or $(DOCKER),(harness default))"
	$(GO) test -count=1 -timeout 40m ./integration/

# The core integration tests on engine DOCKER.
test-core:
	@echo "==> core integration tests on Docker $(or $(DOCKER),(harness default))"
	$(GO) test -count=1 -timeout 20m -run '$(CORE_TESTS)' -skip '$(CORE_SKIP)' ./integration/

# The GRE (and VXLAN) tests on Debian's kernel in the test guest.
test-guest:
	@echo "==> GRE and VXLAN tests in the test guest (Debian's kernel)"
	$(GO) test -count=1 -timeout 15m -v ./guest

# Only what needs no root and no servers.
unit:
	$(GO) test -count=1 -short $(PKGS)

# Fuzz each target for FUZZTIME (the plugin API against the real drivers and
# embedded store; the peer sync against untrusted store records). `make
# test` runs only their seed inputs. Findings land in driver/testdata/fuzz.
FUZZTIME ?= 30s
FUZZ_TARGETS := FuzzPluginAPI FuzzPeerRecords
fuzz:
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzz $$t for $(FUZZTIME)"; \
		$(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./driver/ || exit 1; \
	done

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
