package dockerhosts

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

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
