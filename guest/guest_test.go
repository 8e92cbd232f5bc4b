package guest_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/guest"
	"github.com/dnplabs/docker-net-plugin/internal/dockerhosts"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
)

// greTests are the tests the guest runs, by step, each of which must pass
// there with every subtest: nothing may skip in the guest.
var greTests = []struct {
	step, pkg string
	tests     []string
	env       []string
}{
	// The overlay package's GRE data-plane tests (netlink, namespaces).
	{"overlay", "./overlay", []string{"TestGRE", "TestGREMeshHasNoLoop", "TestTwoHostsPing", "TestSetPeersReconciles", "TestVerifyNetwork", "TestUpdatePeers"}, nil},
	// Two Docker hosts, an encap=gre and a VXLAN overlay.
	{"integration", "./integration", []string{"TestOverlayGRE"}, []string{dockerhosts.PluginBinEnv + "=" + guest.JobDir + "/docker-net-plugin",
		dockerhosts.McastToolEnv + "=" + guest.JobDir + "/dnp-mcast"}},
}

// TestGREInGuest runs the GRE tests (and the VXLAN data plane beside them)
// on Debian's own kernel in a User-mode Linux guest, since the machines'
// kernel has no gretap. Outside CI a machine without the guest's packages
// skips this with the reason; in CI that fails.
func TestGREInGuest(t *testing.T) {
	if guest.Inside() {
		t.Skip("already in the guest")
	}
	if testing.Short() {
		t.Skip("boots a guest: not with -short")
	}
	if err := guest.Available(); err != nil {
		testenv.Missing(t, "test guest: %v", err)
	}
	rel, err := guest.Release()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()

	start := time.Now()
	for _, prog := range []string{"./cmd/docker-net-plugin", "./internal/mcast/dnp-mcast"} {
		if err := guest.Build(ctx, prog, filepath.Join(dir, filepath.Base(prog))); err != nil {
			t.Fatal(err)
		}
	}
	job := guest.Job{Dir: dir, Timeout: 10 * time.Minute}
	for _, g := range greTests {
		bin := filepath.Join(dir, g.step+".test")
		if err := guest.BuildTest(ctx, g.pkg, bin); err != nil {
			t.Fatal(err)
		}
		env := append([]string{"DNP_REQUIRE_GRE=1"}, g.env...)
		if e := os.Getenv("DNP_DOCKER"); e != "" {
			env = append(env, "DNP_DOCKER="+e)
		}
		job.Steps = append(job.Steps, guest.Step{
			Name: g.step,
			Dir:  filepath.Join(guest.SourceDir(), g.pkg),
			Env:  env,
			Args: []string{guest.JobDir + "/" + g.step + ".test", "-test.v", "-test.count=1", "-test.timeout=6m",
				"-test.run", "^(" + strings.Join(g.tests, "|") + ")$"},
		})
	}
	t.Logf("built the plugin and %d test binaries in %s", len(greTests), time.Since(start).Round(time.Millisecond))

	res, err := guest.Run(ctx, job)
	if err != nil {
		if res != nil {
			for _, s := range res.Steps {
				t.Logf("step %s (exit %d) output:\n%s", s.Name, s.Code, lastLines(s.Output, 80))
			}
		}
		t.Fatalf("guest: %v", err)
	}
	var took []string
	for _, s := range res.Steps {
		took = append(took, fmt.Sprintf("%s %s", s.Name, s.Took.Round(time.Second)))
	}
	t.Logf("guest (Debian's user-mode Linux %s): booted in %s, %s in all (%s), %s of host CPU",
		rel, res.Boot.Round(10*time.Millisecond), res.Wall.Round(time.Second), strings.Join(took, ", "), res.CPU.Round(time.Second))

	for i, g := range greTests {
		s := res.Steps[i]
		t.Run(g.step, func(t *testing.T) {
			results := guest.TestResults(s.Output)
			var passed []string
			for name, r := range results {
				if r != "PASS" {
					t.Errorf("in the guest: %s: %s", name, r)
				} else {
					passed = append(passed, name)
				}
			}
			for _, want := range g.tests {
				if results[want] != "PASS" {
					t.Errorf("in the guest: %s did not pass (%q)", want, results[want])
				}
			}
			if s.Code != 0 {
				t.Errorf("in the guest: %s exited %d", g.step, s.Code)
			}
			if t.Failed() {
				t.Logf("output of %s in the guest:\n%s", g.step, lastLines(s.Output, 150))
				return
			}
			slices.Sort(passed)
			t.Logf("passed in the guest (%s): %s", s.Took.Round(time.Second), strings.Join(passed, " "))
			t.Logf("what the tests logged:\n%s", logLines(s.Output))
		})
	}
}

// logLines are the t.Log lines of -test.v output (first lines only).
func logLines(out string) string {
	var keep []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "    ") && strings.Contains(line, ".go:") {
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, "\n")
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
