// Package kvserver runs real servers (etcd, and what package testenv
// builds on it) as child processes that can be stopped and started again
// with the same data. Its API returns errors; testenv wraps it for tests,
// and the demo uses it as it is.
package kvserver

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// Process is a server run as a child process; it can be stopped and
// started again with the same data (to test outages and watch resumption).
type Process struct {
	Name  string
	Args  []string      // program and arguments
	Env   []string      // extra environment
	Dir   string        // working directory; the log is Dir/Name.log
	Ready func() error  // nil once the server answers
	Wait  time.Duration // how long Start waits for Ready (default 30s)
	// Prepare, if set, runs before every start (to repair what a stop
	// may have left, as an operator would before starting the server).
	Prepare func() error

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	log  *os.File
}

// Start runs the server and waits until Ready succeeds.
func (p *Process) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		return fmt.Errorf("%s already running", p.Name)
	}
	if p.Prepare != nil {
		if err := p.Prepare(); err != nil {
			return fmt.Errorf("prepare %s: %w", p.Name, err)
		}
	}
	logPath := filepath.Join(p.Dir, p.Name+".log")
	lf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(p.Args[0], p.Args[1:]...)
	cmd.Dir = p.Dir
	cmd.Env = append(os.Environ(), p.Env...)
	cmd.Stdout, cmd.Stderr = lf, lf
	// Its own process group, so Stop reaches its children too. No
	// Pdeathsig: it fires when the forking OS thread ends, and Go ends
	// threads that netns code left locked, which would kill the server
	// mid-test.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		lf.Close()
		return err
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	p.cmd, p.done, p.log = cmd, done, lf
	wait := p.Wait
	if wait == 0 {
		wait = 30 * time.Second
	}
	deadline := time.Now().Add(wait)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-done:
			out, _ := os.ReadFile(logPath)
			return fmt.Errorf("%s exited during start; log:\n%s", p.Name, tail(out, 3000))
		default:
		}
		if p.Ready == nil {
			return nil
		}
		if last = p.Ready(); last == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, _ := os.ReadFile(logPath)
	return fmt.Errorf("%s not ready after %s: %v; log:\n%s", p.Name, wait, last, tail(out, 3000))
}

// Stop ends the server (SIGTERM, then SIGKILL after 10s) and waits for it.
func (p *Process) Stop() { p.stop(syscall.SIGTERM) }

// Kill ends the server at once with SIGKILL.
func (p *Process) Kill() { p.stop(syscall.SIGKILL) }

func (p *Process) stop(sig syscall.Signal) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil {
		return
	}
	syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	p.log.Close()
	p.cmd, p.done, p.log = nil, nil, nil
}

// Running reports whether the server process is up.
func (p *Process) Running() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cmd != nil
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Options says where a server listens.
type Options struct {
	IP    string // listen address; default 127.0.0.1
	NetNS string // run inside this network namespace (a path such as /run/netns/x); default: the caller's own
}

// Host is the address the server listens on: IP, or 127.0.0.1.
func (o Options) Host() string {
	if o.IP == "" {
		return "127.0.0.1"
	}
	return o.IP
}

// Command prefixes args (a program and its arguments) so that the
// program runs inside NetNS, if set.
func (o Options) Command(args []string) []string {
	if o.NetNS == "" {
		return args
	}
	return append([]string{"nsenter", "--net=" + o.NetNS, "--"}, args...)
}

// Server is a KV server: stop and start it with the embedded Process;
// its data survives a restart.
type Server struct {
	*Process
	Scheme string // etcd, consul or zk
	Addr   string // host:port clients use
}

// URL is a store URL for this server under prefix.
func (s *Server) URL(prefix string) string { return s.Scheme + "://" + s.Addr + "/" + prefix }
