package dockerhosts

import (
	"context"
	"fmt"
	"os/exec"
	"runtime"
	"time"

	"github.com/vishvananda/netns"
)

// ExecIn runs a program in the network namespace at path (a /run/netns file
// or /proc/PID/ns/net, e.g. of a container's PID from docker inspect) and
// returns its trimmed stdout. It is bounded by 2 minutes.
func ExecIn(path string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	return execIn(ctx, path, args...)
}

func execIn(ctx context.Context, path string, args ...string) (string, error) {
	if len(args) == 0 {
		return "", fmt.Errorf("exec in %s: no command", path)
	}
	full := append([]string{"--net=" + path, "--"}, args...)
	return run(ctx, exec.CommandContext(ctx, "nsenter", full...))
}

// DoIn runs fn on the calling goroutine's OS thread switched into the network
// namespace at path, and switches back. Goroutines fn starts do not inherit
// the namespace. If switching back fails the thread is thrown away.
func DoIn(path string, fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	target, err := netns.GetFromPath(path)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", path, err)
	}
	fnErr := fn()
	if err := netns.Set(orig); err != nil {
		// Stay locked: the runtime ends this thread with the goroutine,
		// so no other goroutine runs in the wrong namespace.
		return fmt.Errorf("leave netns %s: %w (fn: %v)", path, err, fnErr)
	}
	runtime.UnlockOSThread()
	return fnErr
}

// ip runs the ip tool in the root namespace, bounded by 30 s.
func ip(args ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err := run(ctx, exec.CommandContext(ctx, "ip", args...))
	return err
}
