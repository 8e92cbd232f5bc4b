package dockerhosts

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// runName matches names that carry a run id: dnpt-<6 hex>[-...].
var runName = regexp.MustCompile(`^dnpt-([0-9a-f]{6})(-|$)`)

// Sweep removes the leftovers of runs whose process is gone (killed test
// binaries or demos): their dockerd, containerd, shims and container processes,
// cgroups, namespaces, mounts and /tmp/dnpt-<id> directories. Runs of live
// processes are left alone, so it is safe to call at any time. It returns
// the prefixes of the runs it removed.
func Sweep() ([]string, error) {
	ids := map[string]bool{}
	addNames := func(names []string) {
		for _, n := range names {
			if m := runName.FindStringSubmatch(n); m != nil {
				ids[m[1]] = true
			}
		}
	}
	addNames(dirNames(baseDir))
	addNames(dirNames("/run/netns"))
	for _, root := range cgroupRoots() {
		addNames(dirNames(root))
	}

	var removed []string
	var errs []error
	for id := range ids {
		if runAlive(id) {
			continue
		}
		if err := removeRun(id); err != nil {
			errs = append(errs, err)
		}
		removed = append(removed, namePrefix+id)
	}
	sort.Strings(removed)
	return removed, errors.Join(errs...)
}

// runAlive reports whether the process that owns run id still lives, or the
// run is so young that its owner file may not be written yet.
func runAlive(id string) bool {
	dir := filepath.Join(baseDir, namePrefix+id)
	b, err := os.ReadFile(filepath.Join(dir, "owner"))
	if err != nil {
		fi, statErr := os.Stat(dir)
		return statErr == nil && time.Since(fi.ModTime()) < time.Minute
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return false
	}
	_, err = os.Stat("/proc/" + strconv.Itoa(pid))
	return err == nil
}

// Leftovers lists what of run id still exists: processes naming its
// directory, namespaces, mounts in this mount namespace, cgroups and the
// directory itself. Empty after a clean teardown.
func Leftovers(id string) []string {
	prefix := namePrefix + id
	var left []string
	for _, p := range runProcs(id) {
		left = append(left, fmt.Sprintf("process %d: %s", p.pid, p.cmdline))
	}
	for _, n := range dirNames("/run/netns") {
		if hasRunPrefix(n, prefix) {
			left = append(left, "netns "+n)
		}
	}
	for _, m := range runMounts(id) {
		left = append(left, "mount "+m)
	}
	for _, d := range runCgroups(id) {
		left = append(left, "cgroup "+d)
	}
	if _, err := os.Stat(filepath.Join(baseDir, prefix)); err == nil {
		left = append(left, "directory "+filepath.Join(baseDir, prefix))
	}
	return left
}

// removeRun kills and removes everything of run id, in an order that lets
// each step succeed: processes, cgroups, namespaces, mounts, files.
func removeRun(id string) error {
	prefix := namePrefix + id
	var errs []error

	// dockerd, containerd, shims: their command lines name the run directory.
	procs := runProcs(id)
	for _, p := range procs {
		syscall.Kill(p.pid, syscall.SIGKILL)
	}
	waitGone(procs, 10*time.Second)

	// Containers and plugins: whatever is in the hosts' cgroups.
	for _, dir := range runCgroups(id) {
		if err := removeCgroupTree(dir); err != nil {
			errs = append(errs, err)
		}
	}

	// Whatever still runs in the run's namespaces: managed plugins (their
	// cgroup is not under the host's cgroup-parent) and legacy plugins.
	procs = runNetnsProcs(id)
	for _, p := range procs {
		syscall.Kill(p.pid, syscall.SIGKILL)
	}
	waitGone(procs, 10*time.Second)

	for _, n := range dirNames("/run/netns") {
		if hasRunPrefix(n, prefix) {
			if err := ip("netns", "del", n); err != nil {
				errs = append(errs, err)
			}
		}
	}

	// Nothing should be mounted in this namespace; detach anything that is,
	// deepest first, before removing files under it.
	mounts := runMounts(id)
	sort.Sort(sort.Reverse(sort.StringSlice(mounts)))
	for _, m := range mounts {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmount %s: %w", m, err))
		}
	}
	dir := filepath.Join(baseDir, prefix)
	if left := runMounts(id); len(left) > 0 {
		errs = append(errs, fmt.Errorf("still mounted, not removing %s: %v", dir, left))
	} else if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("remove %s: %w", dir, err))
	}
	return errors.Join(errs...)
}

type proc struct {
	pid     int
	cmdline string
}

// runProcs lists live processes whose command line names /tmp/dnpt-<id>/.
func runProcs(id string) []proc {
	needle := filepath.Join(baseDir, namePrefix+id) + "/"
	return otherProcs(func(_, cmdline string) bool {
		return strings.Contains(cmdline, needle)
	})
}

// runNetnsProcs lists live processes, other than this one, whose network
// namespace is one of run id's.
func runNetnsProcs(id string) []proc {
	type nsID struct{ dev, ino uint64 }
	ours := map[nsID]bool{}
	for _, n := range dirNames("/run/netns") {
		var st syscall.Stat_t
		if hasRunPrefix(n, namePrefix+id) && syscall.Stat(netnsPath(n), &st) == nil {
			ours[nsID{st.Dev, st.Ino}] = true
		}
	}
	if len(ours) == 0 {
		return nil
	}
	return otherProcs(func(pid, _ string) bool {
		var st syscall.Stat_t
		return syscall.Stat("/proc/"+pid+"/ns/net", &st) == nil && ours[nsID{st.Dev, st.Ino}]
	})
}

// otherProcs lists the live processes other than this one (zombies have
// no command line and are left out) that keep chooses by their PID and
// command line.
func otherProcs(keep func(pid, cmdline string) bool) []proc {
	self := os.Getpid()
	var procs []proc
	for _, name := range dirNames("/proc") {
		pid, err := strconv.Atoi(name)
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile("/proc/" + name + "/cmdline")
		if err != nil || len(b) == 0 { // gone, or a zombie
			continue
		}
		cmdline := strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
		if keep(name, cmdline) {
			procs = append(procs, proc{pid, cmdline})
		}
	}
	return procs
}

func waitGone(procs []proc, d time.Duration) {
	deadline := time.Now().Add(d)
	for _, p := range procs {
		for time.Now().Before(deadline) {
			b, err := os.ReadFile("/proc/" + strconv.Itoa(p.pid) + "/cmdline")
			if err != nil || len(b) == 0 {
				break
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
}

// runMounts lists mount points in this mount namespace that contain dnpt-<id>.
func runMounts(id string) []string {
	var mounts []string
	mountinfo(func(point, _ string) {
		if strings.Contains(point, namePrefix+id) {
			mounts = append(mounts, point)
		}
	})
	return mounts
}

// cgroupRoots lists the mount points of all cgroup hierarchies (v1 and v2).
func cgroupRoots() []string {
	var roots []string
	mountinfo(func(point, fstype string) {
		if fstype == "cgroup" || fstype == "cgroup2" {
			roots = append(roots, point)
		}
	})
	return roots
}

// mountinfo calls fn with the mount point and file system type of each
// mount in this mount namespace (/proc/self/mountinfo; none if it cannot
// be read).
func mountinfo(fn func(point, fstype string)) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		fields, fstype := strings.Fields(pre), strings.Fields(post)
		if len(fields) > 4 && len(fstype) > 0 {
			fn(fields[4], fstype[0])
		}
	}
}

// runCgroups lists the cgroup-parent directories of run id's hosts in every
// hierarchy (dockerd runs with --cgroup-parent=/dnpt-<id>-hN).
func runCgroups(id string) []string {
	var dirs []string
	for _, root := range cgroupRoots() {
		for _, n := range dirNames(root) {
			if hasRunPrefix(n, namePrefix+id) {
				dirs = append(dirs, filepath.Join(root, n))
			}
		}
	}
	return dirs
}

// removeCgroupTree kills every process in the cgroup tree at dir and removes
// its directories, deepest first.
func removeCgroupTree(dir string) error {
	var tree []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			tree = append(tree, p)
		}
		return nil
	})
	deadline := time.Now().Add(10 * time.Second)
	for i := len(tree) - 1; i >= 0; i-- {
		for {
			if b, err := os.ReadFile(filepath.Join(tree[i], "cgroup.procs")); err == nil {
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil {
						syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
			err := syscall.Rmdir(tree[i])
			if err == nil || errors.Is(err, syscall.ENOENT) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("remove cgroup %s: %w", tree[i], err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

func hasRunPrefix(name, prefix string) bool {
	return name == prefix || strings.HasPrefix(name, prefix+"-")
}

// dirNames lists the names in dir, or nothing if it cannot be read.
func dirNames(dir string) []string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
