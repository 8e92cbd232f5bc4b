#!/usr/bin/env bash
# Publishes the managed plugin to a registry. The rootfs is the image the
# Dockerfile builds (FROM scratch + bin/plugin/rootfs: no base image and no
# registry needed to build it); docker create + docker export unpack it
# next to config.json, docker plugin create makes the plugin REF from that
# directory, and docker plugin push sends it to REF's registry.
#
#   make plugin && scripts/push-plugin.sh registry.example.com:5000/dnp:1.0
#   make plugin-push PLUGIN_REF=registry.example.com:5000/dnp:1.0
#
# Environment: PLUGIN_DIR (default bin/plugin, made by make plugin), DOCKER
# (default docker), DOCKER_HOST (the docker CLI's own). With --no-push the
# plugin is only created (disabled) on this Docker host. A registry with a
# self-signed certificate needs its CA in
# /etc/docker/certs.d/HOST:PORT/ca.crt on every Docker host (docs/registry.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PLUGIN_DIR=${PLUGIN_DIR:-bin/plugin}
DOCKER=${DOCKER:-docker}

push=true
ref=
for arg in "$@"; do
  case "$arg" in
    --no-push) push=false ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    -*) echo "push-plugin: unknown option $arg" >&2; exit 2 ;;
    *) [[ -z $ref ]] || { echo "push-plugin: one plugin reference only" >&2; exit 2; }; ref=$arg ;;
  esac
done
if [[ -z $ref || $ref != *:* ]]; then
  echo "usage: scripts/push-plugin.sh [--no-push] REGISTRY/NAME:TAG" >&2
  exit 2
fi
for f in config.json rootfs/docker-net-plugin; do
  [[ -e $PLUGIN_DIR/$f ]] || { echo "push-plugin: no $PLUGIN_DIR/$f: run make plugin first" >&2; exit 1; }
done

image=dnp-rootfs:${ref##*:}
work=$(mktemp -d /tmp/dnp-push.XXXXXX)
container=
cleanup() {
  [[ -n $container ]] && "$DOCKER" rm "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "==> docker build -f Dockerfile -t $image $PLUGIN_DIR"
"$DOCKER" build -q -f Dockerfile -t "$image" "$PLUGIN_DIR"
echo "==> plugin directory from the image (docker create + docker export)"
container=$("$DOCKER" create --network none "$image")
mkdir "$work/rootfs"
"$DOCKER" export "$container" | tar -x -C "$work/rootfs"
cp "$PLUGIN_DIR/config.json" "$work/config.json"
echo "==> docker plugin create $ref"
"$DOCKER" plugin create "$ref" "$work"
if $push; then
  echo "==> docker plugin push $ref"
  "$DOCKER" plugin push "$ref"
fi
