// Package sysutil holds small helpers around Linux system calls that the
// plugin's packages and their tests share.
package sysutil

import (
	"errors"
	"fmt"
	"runtime"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// InNetNS runs fn on a thread of its own in the network namespace at path
// ("" = this one: fn runs directly). Sockets fn opens stay in that
// namespace. The thread goes back to its own namespace afterwards; if it
// cannot, it stays locked and ends with its goroutine, so nothing else
// ever runs in the wrong namespace.
func InNetNS(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	target, err := netns.GetFromPath(path)
	if err != nil {
		return fmt.Errorf("open namespace %s: %w", path, err)
	}
	defer target.Close()
	return InNetNSHandle(target, path, fn)
}

// InNetNSHandle is InNetNS for a namespace already open; name names it in
// errors.
func InNetNSHandle(target netns.NsHandle, name string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		if err := netns.Set(target); err != nil {
			errc <- fmt.Errorf("enter namespace %s: %w", name, err)
			return
		}
		err = fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// WithFD runs fn with the file descriptor of c, leaving its mode
// (non-blocking) as it is.
func WithFD(c syscall.Conn, fn func(fd int) error) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = fn(int(fd)) }); err != nil {
		return err
	}
	return ferr
}

// RetryDump calls dump, and again up to retries more times while the
// kernel interrupts it (netlink.ErrDumpInterrupted: the table changed
// during the dump), and returns what the last call returned.
func RetryDump[T any](retries int, dump func() (T, error)) (T, error) {
	for i := 0; ; i++ {
		res, err := dump()
		if errors.Is(err, netlink.ErrDumpInterrupted) && i < retries {
			continue
		}
		return res, err
	}
}
