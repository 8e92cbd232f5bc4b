// Package guest runs programs (test binaries, mostly) in a throwaway Linux
// guest whose kernel is Debian 12's own, for the kernel features the
// machines' kernel lacks: gretap above all, so that encap=gre is tested on
// every run.
//
// The guest is User-mode Linux (Debian's user-mode-linux package, the
// bookworm 6.1 kernel built to run as a process): it needs no KVM. Its
// root filesystem is this machine's own /, read-only (hostfs), so dockerd,
// busybox, iperf3 and everything else installed here are there too; /tmp,
// /run, /var/lib and the like are tmpfs. A job directory on the host is
// shared writable at JobDir: the test binaries go in, their output comes
// out. The guest has no network device but lo.
//
//	res, err := guest.Run(ctx, guest.Job{Dir: dir, Steps: []guest.Step{
//		{Name: "overlay", Dir: srcDir, Args: []string{guest.JobDir + "/overlay.test", "-test.v"}},
//	}})
//
// Each step runs with CI=true and DNP_GUEST=1 (see Inside) in the
// environment. See docs/gre-guest.md.
package guest

import (
	"bytes"
	"cmp"
	"context"
	_ "embed"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	// Kernel is Debian's User-mode Linux kernel (package user-mode-linux).
	Kernel = "/usr/bin/linux.uml"
	// ModulesDir holds its modules, one directory per release.
	ModulesDir = "/usr/lib/uml/modules"
	// JobDir is where the guest sees the job directory.
	JobDir = "/run/dnp-job"
	// DefaultMemory is the guest's memory unless Job.Memory says otherwise.
	DefaultMemory = "2560M"
	// DefaultTimeout bounds a whole boot unless Job.Timeout says otherwise.
	DefaultTimeout = 10 * time.Minute
)

//go:embed init.sh
var initScript []byte

// Inside reports whether this process runs in the guest.
func Inside() bool { return os.Getenv("DNP_GUEST") == "1" }

// Available says why the guest cannot run on this machine (nil if it can).
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("the guest needs root (its dockerd, namespaces and mounts)")
	}
	if fi, err := os.Stat(Kernel); err != nil || fi.Mode()&0o111 == 0 {
		return fmt.Errorf("%s missing: apt-get install user-mode-linux (or make deps)", Kernel)
	}
	rel, err := Release()
	if err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(ModulesDir, rel, "modules.dep")); err != nil {
		return fmt.Errorf("modules of %s %s: %w (reinstall user-mode-linux)", Kernel, rel, err)
	}
	for _, prog := range []string{"/usr/sbin/modprobe", "/usr/sbin/xtables-legacy-multi"} {
		if _, err := os.Stat(prog); err != nil {
			return fmt.Errorf("%s missing (packages kmod, iptables; make deps): %w", prog, err)
		}
	}
	if _, err := exec.LookPath("busybox"); err != nil {
		return errors.New("busybox missing: apt-get install busybox-static (or make deps)")
	}
	return nil
}

// Release is the guest kernel's release, e.g. "6.1.176".
func Release() (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, Kernel, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w", Kernel, err)
	}
	return strings.TrimSpace(string(out)), nil
}

// Step is one program the guest runs.
type Step struct {
	// Name names the step's files in the job directory: NAME.out (stdout
	// and stderr), NAME.rc (exit code), NAME.time.
	Name string
	// Dir is the working directory (a host path: the guest sees the host's
	// files read-only); "" is JobDir.
	Dir string
	// Env is added to the guest's environment (PATH, HOME, CI=true,
	// DNP_GUEST=1), e.g. "DNP_REQUIRE_GRE=1".
	Env []string
	// Args is the program and its arguments. Files of the job directory
	// are under JobDir.
	Args []string
}

// Job is what one boot of the guest runs, step after step.
type Job struct {
	Dir     string // host directory shared with the guest at JobDir; must exist
	Steps   []Step
	Memory  string        // guest memory, e.g. "2560M"; default DefaultMemory
	Timeout time.Duration // for the whole boot; default DefaultTimeout
}

// StepResult is what one step did.
type StepResult struct {
	Name   string
	Code   int    // exit code; -1 if the step did not finish
	Output string // stdout and stderr
	Took   time.Duration
}

// Result is what one boot did.
type Result struct {
	Boot time.Duration // guest uptime when its init started
	Wall time.Duration // the whole run, boot to power-off, on the host's clock
	// CPU is the host CPU time (user and system) the guest used: what it
	// costs, whatever else the machine was doing.
	CPU     time.Duration
	Steps   []StepResult
	Console string // the guest's console: kernel messages and init's progress
}

// Run boots the guest, runs the job's steps and returns what they did. An
// error means the guest itself failed (did not boot, did not finish in
// time); a step that failed is a StepResult with a nonzero Code.
func Run(ctx context.Context, job Job) (*Result, error) {
	if err := Available(); err != nil {
		return nil, err
	}
	if len(job.Steps) == 0 {
		return nil, errors.New("guest: no steps")
	}
	dir, err := filepath.Abs(job.Dir)
	if err != nil {
		return nil, err
	}
	if strings.ContainsAny(dir, " \t\n,") {
		return nil, fmt.Errorf("guest: job directory %q: no spaces or commas, please (kernel command line)", dir)
	}
	script, err := jobScript(job.Steps)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "init.sh"), initScript, 0o755); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "job.sh"), script, 0o644); err != nil {
		return nil, err
	}
	mem := cmp.Or(job.Memory, DefaultMemory)
	timeout := job.Timeout
	if timeout == 0 {
		timeout = DefaultTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	console, err := os.Create(filepath.Join(dir, "console.log"))
	if err != nil {
		return nil, err
	}
	defer console.Close()
	// No network device (no ethN=), no disk, consoles to nowhere but the
	// first, which writes to console.log; UML's own runtime files (pid,
	// management socket) in the job directory, not in ~/.uml.
	cmd := exec.Command(Kernel, "mem="+mem, "rootfstype=hostfs", "rootflags=/", "ro",
		"init="+filepath.Join(dir, "init.sh"), "con=null", "ssl=null", "con0=null,fd:1", "quiet",
		"uml_dir="+dir)
	cmd.Stdout, cmd.Stderr = console, console
	cmd.Dir = dir
	// UML runs every guest process as a host process of its own: the group
	// is killed as a whole.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", Kernel, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var waitErr error
	select {
	case waitErr = <-done:
	case <-ctx.Done():
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		waitErr = fmt.Errorf("guest still running after %s, killed: %w", timeout, ctx.Err())
	}
	// Guest processes that outlived the kernel's process (none should).
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)

	res := &Result{Wall: time.Since(start)}
	if ps := cmd.ProcessState; ps != nil {
		res.CPU = ps.UserTime() + ps.SystemTime()
	}
	b, _ := os.ReadFile(console.Name())
	res.Console = string(b)
	if s, err := readFloat(filepath.Join(dir, "boot-seconds")); err == nil {
		res.Boot = time.Duration(s * float64(time.Second))
	}
	for _, st := range job.Steps {
		res.Steps = append(res.Steps, readStep(dir, st.Name))
	}
	if b, err := os.ReadFile(filepath.Join(dir, "setup-error")); err == nil {
		return res, fmt.Errorf("guest setup: %s", strings.TrimSpace(string(b)))
	}
	if _, err := os.Stat(filepath.Join(dir, "job.rc")); err != nil {
		return res, fmt.Errorf("guest did not finish its job (%v); console:\n%s", waitErr, tail(res.Console, 3000))
	}
	return res, nil
}

// jobScript is the shell script that runs the steps in order, each in
// its directory with its environment, and records what it did.
func jobScript(steps []Step) ([]byte, error) {
	var b bytes.Buffer
	b.WriteString("# Written by package guest: the steps of one guest run.\n")
	b.WriteString("up() { cut -d' ' -f1 /proc/uptime; }\n")
	seen := map[string]bool{}
	for _, st := range steps {
		if st.Name == "" || strings.ContainsAny(st.Name, "/ \t\n'\"$`\\") || seen[st.Name] {
			return nil, fmt.Errorf("guest: bad or repeated step name %q", st.Name)
		}
		seen[st.Name] = true
		if len(st.Args) == 0 {
			return nil, fmt.Errorf("guest: step %s: no program", st.Name)
		}
		dir := cmp.Or(st.Dir, JobDir)
		fmt.Fprintf(&b, "echo \"dnp-guest: step %s\"\n", st.Name)
		fmt.Fprintf(&b, "s=$(up)\n")
		fmt.Fprintf(&b, "(cd %s && exec env", quote(dir))
		for _, e := range st.Env {
			if !strings.Contains(e, "=") {
				return nil, fmt.Errorf("guest: step %s: environment %q is not NAME=value", st.Name, e)
			}
			fmt.Fprintf(&b, " %s", quote(e))
		}
		for _, a := range st.Args {
			fmt.Fprintf(&b, " %s", quote(a))
		}
		fmt.Fprintf(&b, ") >%s.out 2>&1 </dev/null\n", st.Name)
		fmt.Fprintf(&b, "echo $? >%s.rc\n", st.Name)
		fmt.Fprintf(&b, "echo \"$s $(up)\" >%s.time\n", st.Name)
	}
	return b.Bytes(), nil
}

func readStep(dir, name string) StepResult {
	r := StepResult{Name: name, Code: -1}
	if b, err := os.ReadFile(filepath.Join(dir, name+".out")); err == nil {
		r.Output = string(b)
	}
	if b, err := os.ReadFile(filepath.Join(dir, name+".rc")); err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
			r.Code = n
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, name+".time")); err == nil {
		var from, to float64
		if _, err := fmt.Sscan(string(b), &from, &to); err == nil {
			r.Took = time.Duration((to - from) * float64(time.Second))
		}
	}
	return r
}

// quote makes s one word for sh.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

func readFloat(path string) (float64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	return strconv.ParseFloat(strings.TrimSpace(string(b)), 64)
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}
