#!/bin/sh
# PID 1 of the test guest (package guest). The kernel is Debian's
# User-mode Linux; / is this machine's own root, read-only over hostfs.
# This script lives in the job directory on the host ($0 names it there);
# it mounts that directory writable on /run/dnp-job, makes the rest a
# machine the tests can run on, runs /run/dnp-job/job.sh and powers off.
# The guest has no network device but lo: nothing it does leaves it.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
host_job=$(dirname "$0")
job=/run/dnp-job

say() { echo "dnp-guest: $*"; }
off() {
	sync
	busybox poweroff -f
	sleep 60
}
must() {
	"$@" || {
		say "setup failed: $*"
		[ -d $job ] && echo "setup failed: $*" >$job/setup-error
		off
	}
}

must mount -t proc -o nosuid,nodev,noexec proc /proc
must mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
must mount -t tmpfs -o mode=0755,nosuid,nodev run /run
mkdir -p $job /run/lock /run/dnp-bin /run/dnp-modules/lib
must mount -t hostfs -o "$host_job" none $job
cut -d' ' -f1 /proc/uptime >$job/boot-seconds

must mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm
must mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
must mount -t tmpfs -o nosuid,nodev tmpfs /dev/shm
# Writable places over the read-only root. /etc stays read-only: the
# harness binds its own /etc/docker and resolv.conf for each dockerd.
must mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
for d in /var/tmp /var/lib /var/log /var/cache /root; do
	must mount -t tmpfs -o mode=0755 tmpfs $d
done
chmod 1777 /var/tmp

# The kernel's modules are the user-mode-linux package's: a modprobe that
# looks there goes first on PATH and is the kernel's module loader.
ln -s /usr/lib/uml/modules /run/dnp-modules/lib/modules
printf '#!/bin/sh\nexec /usr/sbin/modprobe -d /run/dnp-modules "$@"\n' >/run/dnp-bin/modprobe
chmod 755 /run/dnp-bin/modprobe
echo /run/dnp-bin/modprobe >/proc/sys/kernel/modprobe
# This kernel has iptables (legacy) but no nftables for IPv4: iptables is
# the legacy one here, for dockerd too.
for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do
	ln -s /usr/sbin/xtables-legacy-multi /run/dnp-bin/$n
done
export PATH=/run/dnp-bin:$PATH

hostname dnp-guest
ip link set lo up
modprobe -a bridge br_netfilter veth vxlan ip_gre overlay >$job/modprobe.log 2>&1 || say "modprobe failed: $(cat $job/modprobe.log)"

say "up after $(cut -d' ' -f1 /proc/uptime) s"
export CI=true DNP_GUEST=1
(cd $job && /bin/sh ./job.sh)
echo $? >$job/job.rc
say "done after $(cut -d' ' -f1 /proc/uptime) s"
off
