#!/usr/bin/env bash
# The GRE test guest by hand (docs/gre-guest.md). The machines' own kernel
# has no gretap; Debian 12's has, and runs here as User-mode Linux (package
# user-mode-linux) with this machine's / as its read-only root.
#
#   scripts/gre-guest.sh                  run the GRE tests in the guest, as make test does
#   scripts/gre-guest.sh run CMD [ARG...] run one command in the guest (root, CI=true),
#                                         e.g. run ip link add g type gretap local 10.0.0.1 remote 10.0.0.2
#
# Needs root. Installs user-mode-linux and kmod if they are missing (make
# deps installs them too).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $(id -u) -ne 0 ]]; then
	echo "gre-guest: run as root" >&2
	exit 1
fi
missing=()
for p in user-mode-linux kmod busybox-static iptables; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
	echo "gre-guest: apt-get install ${missing[*]}" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

case ${1:-test} in
test)
	exec go test -count=1 -v -timeout 20m -run '^TestGREInGuest$' ./guest
	;;
run)
	# The init the tests boot (guest/init.sh) with the command as its job;
	# the guest's console, and so the command's output, comes here.
	shift
	if [[ $# -eq 0 ]]; then
		echo "usage: $0 run COMMAND [ARG...]" >&2
		exit 2
	fi
	dir=$(mktemp -d /tmp/dnp-guest-run.XXXXXX)
	trap 'rm -rf "$dir"' EXIT
	install -m 755 guest/init.sh "$dir/init.sh"
	printf '%q ' "$@" >"$dir/job.sh"
	echo "gre-guest: booting Debian's User-mode Linux $(linux.uml --version); / is this machine's, read-only" >&2
	linux.uml mem=2560M rootfstype=hostfs rootflags=/ ro init="$dir/init.sh" con=null ssl=null con0=null,fd:1 quiet uml_dir="$dir"
	exit "$(cat "$dir/job.rc" 2>/dev/null || echo 1)"
	;;
*)
	echo "usage: $0 [test | run COMMAND [ARG...]]" >&2
	exit 2
	;;
esac
