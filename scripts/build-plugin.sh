#!/usr/bin/env bash
# Builds the managed-plugin directory: a static binary in a minimal rootfs
# next to config.json. No registry and no base image are needed: the plugin
# programs the kernel over netlink and runs no other program.
#
#   scripts/build-plugin.sh                 # -> bin/plugin/{config.json,rootfs/}
#   scripts/build-plugin.sh --create        # ... and docker plugin create dnp:latest
#   PLUGIN_NAME=dnp:1.0 DOCKER_HOST=unix:///run/docker.sock scripts/build-plugin.sh --create
#
# Environment: PLUGIN_DIR (default bin/plugin), PLUGIN_NAME (default
# dnp:latest), PLUGIN_VERSION (default: git describe), GO (default go),
# DOCKER (default docker), DOCKER_HOST (the docker CLI's own). With
# --create the plugin is created disabled: set what you need
# (docker plugin set PLUGIN_NAME DNP_STORE=... ) and enable it.
set -euo pipefail
cd "$(dirname "$0")/.."

PLUGIN_DIR=${PLUGIN_DIR:-bin/plugin}
PLUGIN_NAME=${PLUGIN_NAME:-dnp:latest}
GO=${GO:-go}
DOCKER=${DOCKER:-docker}

create=false
for arg in "$@"; do
  case "$arg" in
    --create) create=true ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "build-plugin: unknown argument $arg" >&2; exit 2 ;;
  esac
done

version=${PLUGIN_VERSION:-$(git describe --tags --always --dirty 2>/dev/null || echo dev)}
rootfs="$PLUGIN_DIR/rootfs"

echo "==> building static binary (version $version)"
rm -rf "$PLUGIN_DIR"
mkdir -p "$rootfs"
CGO_ENABLED=0 "$GO" build -trimpath -ldflags "-s -w -X main.version=$version" \
  -o "$rootfs/docker-net-plugin" ./cmd/docker-net-plugin

# Directories the plugin uses: its socket, the propagated mount (unused, but
# its presence makes dockerd give the plugin shared mount propagation), the
# state mount (embedded store and overlay namespaces, on the host), the TLS
# bind mount, and the usual kernel mount points.
for d in run/docker/plugins run/dnp var/lib/docker-net-plugin etc/docker-net-plugin proc sys dev tmp; do
  mkdir -p "$rootfs/$d"
done
chmod 1777 "$rootfs/tmp"
cp config.json "$PLUGIN_DIR/config.json"
echo "==> plugin directory $PLUGIN_DIR ($(du -sh "$rootfs" | cut -f1))"

if ! $create; then
  exit 0
fi
echo "==> docker plugin create $PLUGIN_NAME $PLUGIN_DIR${DOCKER_HOST:+ (DOCKER_HOST=$DOCKER_HOST)}"
if "$DOCKER" plugin inspect "$PLUGIN_NAME" >/dev/null 2>&1; then
  echo "build-plugin: plugin $PLUGIN_NAME exists; remove it first (docker plugin disable $PLUGIN_NAME && docker plugin rm $PLUGIN_NAME)" >&2
  exit 1
fi
"$DOCKER" plugin create "$PLUGIN_NAME" "$PLUGIN_DIR"
cat <<EOF
==> created $PLUGIN_NAME (disabled). Next:
    mkdir -p /etc/docker-net-plugin /var/lib/docker-net-plugin   # mount sources must exist
    docker plugin set $PLUGIN_NAME DNP_STORE=etcd://10.0.0.1:2379/dnp DNP_ADVERTISE_ADDR=10.0.0.11   # optional
    docker plugin enable $PLUGIN_NAME
    docker network create -d $PLUGIN_NAME --ipam-driver $PLUGIN_NAME --subnet 10.20.0.0/24 -o overlay=blue blue
EOF
