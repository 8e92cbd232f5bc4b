package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestMachineID: made once, the same on every later start, different per
// state directory; a corrupt file is a clear error.
func TestMachineID(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	a, err := machineID(dir)
	if err != nil || !validMachineID(a) {
		t.Fatalf("first start: %q, %v", a, err)
	}
	if again, err := machineID(dir); err != nil || again != a {
		t.Fatalf("second start: %q, %v; want %q", again, err, a)
	}
	if other, err := machineID(t.TempDir()); err != nil || other == a {
		t.Fatalf("another machine: %q, %v; want an id other than %q", other, err, a)
	}
	if err := os.WriteFile(filepath.Join(dir, machineIDFile), []byte("garbage\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := machineID(dir); err == nil || !strings.Contains(err.Error(), "delete it") {
		t.Fatalf("corrupt machine id file: %v; want a clear error", err)
	}
}
