package guest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func TestTestResults(t *testing.T) {
	out := `=== RUN   TestA
--- PASS: TestA (1.00s)
=== RUN   TestB
=== RUN   TestB/gre
    helpers_test.go:10: SKIP: no gretap
=== RUN   TestB/vxlan
--- FAIL: TestB (2.00s)
    --- SKIP: TestB/gre (0.10s)
    --- PASS: TestB/vxlan (1.90s)
FAIL
`
	got := TestResults(out)
	want := map[string]string{"TestA": "PASS", "TestB": "FAIL", "TestB/gre": "SKIP", "TestB/vxlan": "PASS"}
	if len(got) != len(want) {
		t.Fatalf("TestResults = %v, want %v", got, want)
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("TestResults[%s] = %q, want %q", k, got[k], v)
		}
	}
}

// The job script runs each step in its directory with its environment and
// arguments exactly as given, and records its exit code.
func TestJobScript(t *testing.T) {
	dir := t.TempDir()
	script, err := jobScript([]Step{
		{Name: "one", Dir: dir, Env: []string{"X=a b 'c'"}, Args: []string{"sh", "-c", `printf '%s|%s|%s' "$X" "$1" "$(pwd)"`, "sh", "it's $HOME"}},
		{Name: "two", Dir: dir, Args: []string{"sh", "-c", "exit 3"}},
	})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sh", "-c", string(script))
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("job script: %v: %s\n%s", err, out, script)
	}
	r := readStep(dir, "one")
	if want := "a b 'c'|it's $HOME|" + dir; r.Output != want || r.Code != 0 {
		t.Errorf("step one: code %d output %q, want 0 %q", r.Code, r.Output, want)
	}
	if r := readStep(dir, "two"); r.Code != 3 {
		t.Errorf("step two: code %d, want 3", r.Code)
	}
	if _, err := os.Stat(filepath.Join(dir, "one.time")); err != nil {
		t.Error(err)
	}
	for _, bad := range []Step{{Name: "a/b", Args: []string{"true"}}, {Name: "x"}, {Name: "y", Env: []string{"NOEQUALS"}, Args: []string{"true"}}} {
		if _, err := jobScript([]Step{bad}); err == nil || !strings.Contains(err.Error(), "guest:") {
			t.Errorf("jobScript(%+v) = %v, want an error", bad, err)
		}
	}
}
