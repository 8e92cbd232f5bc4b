#!/usr/bin/env bash
# Builds Consul v1.22.7 from the Go module proxy (there is no Debian package)
# and installs the binary at ${CONSUL_BIN:-/opt/dnp/bin/consul}.
#
# Cold build: about 4 minutes and 3 GB of memory. When the binary is already
# there and reports the wanted version, the script exits at once.
# Nothing is written inside the repository; the sources are copied to a
# temporary directory that is removed on exit.
set -euo pipefail

CONSUL_VERSION=1.22.7
# The api module pinned by consul's own go.mod is replaced by a local path in
# the source tree; after dropping that replace we need a published version.
CONSUL_API_VERSION=v1.34.1
OUT=${CONSUL_BIN:-/opt/dnp/bin/consul}

log() { echo "build-consul: $*" >&2; }

# is_wanted BINARY: true when BINARY runs and reports the wanted version.
is_wanted() {
	local out
	[[ -x "$1" ]] || return 1
	out=$("$1" version 2>/dev/null) || return 1
	[[ "${out%%$'\n'*}" == "Consul v${CONSUL_VERSION}" ]]
}

if is_wanted "$OUT"; then
	log "$OUT is already Consul v${CONSUL_VERSION}; nothing to do"
	exit 0
fi

command -v go >/dev/null || { log "go not found in PATH"; exit 1; }
export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod"

work=$(mktemp -d /tmp/build-consul.XXXXXX)
trap 'chmod -R u+w "$work" 2>/dev/null || true; rm -rf "$work"' EXIT

start=$(date +%s)
log "downloading github.com/hashicorp/consul@v${CONSUL_VERSION} from the module proxy"
dir=$(cd "$work" && go mod download -json "github.com/hashicorp/consul@v${CONSUL_VERSION}" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
if [[ -z "$dir" || ! -d "$dir" ]]; then
	log "could not find the downloaded module directory"
	exit 1
fi

log "copying sources from $dir"
cp -r "$dir" "$work/src"
chmod -R u+w "$work/src"
cd "$work/src"

log "dropping replace directives for nested modules"
for m in api envoyextensions proto-public sdk troubleshoot; do
	go mod edit -dropreplace "github.com/hashicorp/consul/$m"
done

log "pinning github.com/hashicorp/consul/api@${CONSUL_API_VERSION}"
go get "github.com/hashicorp/consul/api@${CONSUL_API_VERSION}"

log "building (this takes a few minutes and about 3 GB of memory)"
go build -trimpath -o "$work/consul" .
if ! is_wanted "$work/consul"; then
	log "built binary does not report Consul v${CONSUL_VERSION}:"
	"$work/consul" version >&2 || true
	exit 1
fi

# Copy next to the destination first, so the final rename is atomic.
mkdir -p "$(dirname "$OUT")"
cp "$work/consul" "$OUT.tmp.$$"
mv -f "$OUT.tmp.$$" "$OUT"

log "installed Consul v${CONSUL_VERSION} at $OUT ($(du -h "$OUT" | cut -f1)) in $(( $(date +%s) - start ))s"
