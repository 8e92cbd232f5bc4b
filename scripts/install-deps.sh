#!/usr/bin/env bash
# Installs everything the demo and the tests need on a fresh Debian 12
# machine (as root): Docker 20.10 (and 26.1, 28.5 unpacked beside it), etcd,
# ZooKeeper, busybox for the test image, iperf3, docker-registry (for the
# plugin install and upgrade test), Debian's User-mode Linux kernel for the
# GRE test guest (docs/gre-guest.md), and a Consul server built once from the
# Go module proxy (kept outside the repository and reused).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (it installs packages and the tests create network namespaces)" >&2
  exit 1
fi

packages=(docker.io etcd-server etcd-client zookeeper libslf4j-java busybox-static iperf3 iproute2
  iptables procps psmisc jq ca-certificates docker-registry user-mode-linux kmod)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  step "Debian packages already installed"
fi
# The tests start docker-registry themselves, on the test underlay only;
# the package's own service (all addresses, port 5000) stays off.
if command -v systemctl >/dev/null && systemctl is-enabled docker-registry >/dev/null 2>&1; then
  systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

step "Go modules"
go mod download

step "Docker engines 26.1 and 28.5 from Debian's archive (unpacked in /opt/dnp/docker)"
bash scripts/install-docker-engines.sh

step "Consul server binary"
bash scripts/build-consul.sh
step "dependencies ready"
