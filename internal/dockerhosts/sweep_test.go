package dockerhosts

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The sweeper finds a run's mounts and the cgroup hierarchies it must
// clean up from /proc/self/mountinfo.
func TestMountinfo(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount")
	}
	id := "sweeptest" + filepath.Base(t.TempDir())
	dir := filepath.Join(t.TempDir(), namePrefix+id+"-h1")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	if got := runMounts(id); !slices.Equal(got, []string{dir}) {
		t.Errorf("runMounts(%q) = %q, want [%s]", id, got, dir)
	}
	if got := runMounts(id + "x"); len(got) != 0 {
		t.Errorf("runMounts of another run = %q, want none", got)
	}

	roots := cgroupRoots()
	if len(roots) == 0 {
		t.Error("cgroupRoots() found no cgroup hierarchy")
	}
	for _, root := range roots {
		var st unix.Statfs_t
		if err := unix.Statfs(root, &st); err != nil {
			t.Errorf("cgroup root %s: %v", root, err)
		} else if st.Type != unix.CGROUP_SUPER_MAGIC && st.Type != unix.CGROUP2_SUPER_MAGIC {
			t.Errorf("cgroup root %s: file system type %#x, not cgroup", root, st.Type)
		}
	}
}

// The sweeper finds a run's processes by their command line and by their
// network namespace, and never this process.
func TestRunProcs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	id := fmt.Sprintf("sweeptest%d", os.Getpid())
	byName := exec.Command("sh", "-c", "sleep 60; : "+filepath.Join(baseDir, namePrefix+id)+"/x")
	if err := byName.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { byName.Process.Kill(); byName.Wait() })

	ns := namePrefix + id + "-h1"
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	inNS := exec.Command("ip", "netns", "exec", ns, "sleep", "60")
	if err := inNS.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inNS.Process.Kill(); inNS.Wait() })

	pids := func(procs []proc) []int {
		var p []int
		for _, pr := range procs {
			p = append(p, pr.pid)
		}
		return p
	}
	// ip netns exec execs sleep: give it a moment to be in the namespace.
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && !slices.Contains(pids(runNetnsProcs(id)), inNS.Process.Pid) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := pids(runProcs(id)); !slices.Equal(got, []int{byName.Process.Pid}) {
		t.Errorf("runProcs = %v, want [%d]", got, byName.Process.Pid)
	}
	if got := pids(runNetnsProcs(id)); !slices.Equal(got, []int{inNS.Process.Pid}) {
		t.Errorf("runNetnsProcs = %v, want [%d]", got, inNS.Process.Pid)
	}
}
