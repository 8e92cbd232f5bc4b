# docker-net-plugin: see README.md.
GO      ?= go
BIN     := bin/docker-net-plugin
PKGS    := ./...

.PHONY: all build deps test unit vet demo bench clean

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

demo: deps build
	bash scripts/demo.sh

bench: deps build
	bash scripts/bench.sh

clean:
	rm -rf bin
