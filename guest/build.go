package guest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
)

// SourceDir is the module's directory on this machine: the guest sees it
// at the same path (read-only), so test binaries run in their package's
// directory there, as go test runs them.
func SourceDir() string {
	_, here, _, _ := runtime.Caller(0) // .../guest/build.go
	return filepath.Dir(filepath.Dir(here))
}

// BuildTest compiles the tests of package pkg (a path relative to the
// module, e.g. "./overlay") into the binary out.
func BuildTest(ctx context.Context, pkg, out string) error {
	return gocmd(ctx, "test", "-c", "-o", out, pkg)
}

// Build compiles the command pkg (e.g. "./cmd/docker-net-plugin") into out,
// statically (CGO_ENABLED=0).
func Build(ctx context.Context, pkg, out string) error {
	return gocmd(ctx, "build", "-trimpath", "-o", out, pkg)
}

func gocmd(ctx context.Context, args ...string) error {
	cmd := exec.CommandContext(ctx, "go", args...)
	cmd.Dir = SourceDir()
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

var testLine = regexp.MustCompile(`(?m)^\s*--- (PASS|FAIL|SKIP): (\S+) \(`)

// TestResults reads the -test.v output of a test binary: the result
// (PASS, FAIL or SKIP) of every test and subtest, by full name.
func TestResults(out string) map[string]string {
	res := map[string]string{}
	for _, m := range testLine.FindAllStringSubmatch(out, -1) {
		res[m[2]] = m[1]
	}
	return res
}
