#!/usr/bin/env bash
# Unpacks the newer Docker engines from Debian's own archive next to
# bookworm's docker.io 20.10 (installed by install-deps.sh):
#
#   /opt/dnp/docker/26.1   trixie: docker.io 26.1.5, containerd 1.7.24, docker-cli
#   /opt/dnp/docker/28.5   sid:    docker.io 28.5.2, containerd 2.1.9, docker-cli,
#                                  docker-compose 2.40.3 (CLI plugin)
#
# They are unpacked (dpkg -x), not installed: nothing of the system's
# docker.io changes. Each directory has bin/ with dockerd, containerd,
# containerd-shim-runc-v2, docker and docker-proxy (and docker-compose in
# 28.5's cli-plugins) and a VERSION file; runc stays bookworm's (sid's needs
# a newer glibc). A directory that is complete is left alone.
set -euo pipefail

ROOT=${DNP_DOCKER_ROOT:-/opt/dnp/docker}
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
log() { echo "install-docker-engines: $*" >&2; }

# fetch VERSION SUITE PACKAGE...: download PACKAGEs of SUITE and unpack them
# into $ROOT/VERSION.
fetch() {
	local version=$1 suite=$2
	shift 2
	local dest=$ROOT/$version
	if [[ -f $dest/VERSION && -x $dest/bin/dockerd ]]; then
		log "$dest: $(head -1 "$dest/VERSION") already there"
		return
	fi
	local work
	work=$(mktemp -d /tmp/dnp-engines.XXXXXX)
	trap 'rm -rf "$work"' RETURN
	mkdir -p "$work/sources" "$work/lists/partial" "$work/cache/archives/partial" "$work/debs" "$work/root"
	cat >"$work/sources/$suite.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $suite
Components: main
Signed-By: $KEYRING
EOF
	local apt=(apt-get -qq -o Dir::Etc::sourcelist=/dev/null -o "Dir::Etc::sourceparts=$work/sources"
		-o "Dir::State::lists=$work/lists" -o "Dir::Cache=$work/cache" -o APT::Get::List-Cleanup=0 -o APT::Sandbox::User=root)
	log "$suite: apt-get update"
	"${apt[@]}" update
	log "$suite: downloading $*"
	(cd "$work/debs" && "${apt[@]}" download "$@")
	for deb in "$work"/debs/*.deb; do
		dpkg -x "$deb" "$work/root"
	done
	rm -rf "$dest.tmp"
	mkdir -p "$dest.tmp/bin"
	cp -a "$work/root/usr" "$dest.tmp/"
	for prog in dockerd docker-proxy docker containerd containerd-shim-runc-v2 ctr; do
		local found
		found=$(find "$dest.tmp/usr/sbin" "$dest.tmp/usr/bin" "$dest.tmp/usr/libexec" -name "$prog" -type f 2>/dev/null | head -1 || true)
		[[ -n $found ]] && ln -s "${found#$dest.tmp/}" "$dest.tmp/bin/$prog"
	done
	# Relative links resolve from bin/: point them one level up.
	for l in "$dest.tmp"/bin/*; do
		ln -sfn "../$(readlink "$l")" "$l"
	done
	local compose=$dest.tmp/usr/libexec/docker/cli-plugins/docker-compose
	[[ -x $compose ]] && ln -s ../usr/libexec/docker/cli-plugins/docker-compose "$dest.tmp/bin/docker-compose"
	"$dest.tmp/bin/dockerd" --version >"$dest.tmp/VERSION"
	"$dest.tmp/bin/containerd" --version >>"$dest.tmp/VERSION"
	rm -rf "$dest"
	mv "$dest.tmp" "$dest"
	log "$dest: $(head -1 "$dest/VERSION")"
}

fetch 26.1 trixie docker.io containerd docker-cli
fetch 28.5 sid docker.io containerd docker-cli docker-compose
