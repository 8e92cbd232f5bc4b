# docker-net-plugin: see README.md.
GO      ?= go
BIN     := bin/docker-net-plugin
PKGS    := ./...
# The Docker engine the integration tests, the demo and the benchmarks run:
# 20.10 (Debian 12's docker.io), 26.1 (trixie's) or 28.5 (sid's), e.g.
# `make test DOCKER=28.5`. Empty: the harness default (20.10).
DOCKER  ?=
export DNP_DOCKER := $(DOCKER)

.PHONY: all build plugin deps test unit vet fuzz demo bench clean

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
# integration tests against real dockerd hosts; then, on their own (the
# guest is an emulated machine: it wants the CPU), the GRE tests in the
# test guest on Debian's kernel (docs/gre-guest.md). Needs root.
test: deps vet
	$(GO) test -count=1 -timeout 25m $$($(GO) list $(PKGS) | grep -v '/guest$$')
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
plugin:
	PLUGIN_DIR=bin/plugin PLUGIN_NAME=$(PLUGIN_NAME) bash scripts/build-plugin.sh $(if $(CREATE),--create)

# Docker hosts in network namespaces on this machine, the plugin installed
# as a managed plugin in each; containers ping across hosts. Needs root.
demo: deps plugin
	$(GO) run ./cmd/dnp-demo -plugin-dir bin/plugin

bench: deps build
	bash scripts/bench.sh

clean:
	rm -rf bin
