package overlay

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultDir is where named network namespaces live, as with `ip netns`.
const DefaultDir = "/run/netns"

// openNamedNS opens the namespace bound at path. It returns os.ErrNotExist
// (wrapped) if there is none, including when a file is there but nothing is
// mounted on it (left over from an interrupted create).
func openNamedNS(path string) (netns.NsHandle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return netns.None(), fmt.Errorf("open namespace %s: %w", path, err)
	}
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(ns), &st); err != nil {
		ns.Close()
		return netns.None(), fmt.Errorf("statfs %s: %w", path, err)
	}
	if st.Type != unix.NSFS_MAGIC {
		ns.Close()
		return netns.None(), fmt.Errorf("namespace %s: nothing mounted on it: %w", path, os.ErrNotExist)
	}
	return ns, nil
}

// isNamedNS reports whether a namespace is bound at path.
func isNamedNS(path string) bool {
	var st unix.Statfs_t
	return unix.Statfs(path, &st) == nil && st.Type == unix.NSFS_MAGIC
}

// ensureNamedNS opens the namespace bound at path, creating it if needed;
// created says whether it did.
func ensureNamedNS(path string) (ns netns.NsHandle, created bool, err error) {
	ns, err = openNamedNS(path)
	if err == nil {
		return ns, false, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return netns.None(), false, err
	}
	if err := createNamedNS(path); err != nil {
		return netns.None(), false, err
	}
	ns, err = openNamedNS(path)
	return ns, err == nil, err
}

// createNamedNS makes a new network namespace and bind-mounts it at path,
// like `ip netns add`. A stale file at path (nothing mounted) is replaced.
func createNamedNS(path string) error {
	if err := prepareNetnsDir(filepath.Dir(path)); err != nil {
		return err
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove stale %s: %w", path, err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return fmt.Errorf("create %s: %w", path, err)
	}
	f.Close()

	err = inNewNetNS(func() error {
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(self, path, "none", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind-mount namespace on %s: %w", path, err)
		}
		return nil
	})
	if err != nil {
		os.Remove(path)
		return err
	}
	return nil
}

// inNewNetNS runs fn on a thread that first moves into a new, empty network
// namespace. The thread goes back to its own namespace afterwards and only
// then to the Go scheduler; if it cannot, it stays locked and ends with the
// goroutine, so no other code ever runs in the wrong namespace. (A thread
// left locked cannot end if it is the process's main thread: it would keep
// /proc/<pid>/ns/net pointing at the throwaway namespace.) The namespace
// itself disappears with fn unless fn keeps it (for example by
// bind-mounting it).
func inNewNetNS(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open this thread's network namespace: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread() // unshare failed: still in orig
			errc <- fmt.Errorf("unshare network namespace: %w", err)
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	select {
	case err := <-errc:
		return err
	case <-time.After(opTimeout):
		return fmt.Errorf("new network namespace: timed out after %s", opTimeout)
	}
}

// prepareNetnsDir makes dir a shared mount point, as iproute2 does, so
// that unmounting a namespace there also unmounts the copies that other
// mount namespaces (for example a dockerd started with unshare -m) hold.
func prepareNetnsDir(netnsDir string) error {
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		return fmt.Errorf("create %s: %w", netnsDir, err)
	}
	err := unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if errors.Is(err, unix.EINVAL) { // not a mount point yet
		if err := unix.Mount(netnsDir, netnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind-mount %s on itself: %w", netnsDir, err)
		}
		err = unix.Mount("", netnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	}
	if err != nil {
		return fmt.Errorf("make %s a shared mount: %w", netnsDir, err)
	}
	return nil
}

// removeNamedNS unmounts and removes the namespace bound at path. A missing
// path is not an error.
func removeNamedNS(path string) error {
	err := unix.Unmount(path, unix.MNT_DETACH)
	if err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("remove %s: %w", path, err)
	}
	return nil
}

// namedNSes lists the names in netnsDir that start with prefix, without it.
func namedNSes(netnsDir, prefix string) ([]string, error) {
	entries, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", netnsDir, err)
	}
	var names []string
	for _, e := range entries {
		if name := e.Name(); len(name) > len(prefix) && name[:len(prefix)] == prefix {
			names = append(names, name[len(prefix):])
		}
	}
	return names, nil
}
