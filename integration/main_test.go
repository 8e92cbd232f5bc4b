package integration

import (
	"os"
	"path/filepath"
	"testing"
)

// TestMain removes what the tests built once per binary (the plugin binary
// and the managed plugin's directory) when they are done.
func TestMain(m *testing.M) {
	code := m.Run()
	for _, p := range []string{binPath, pluginDir} {
		if p != "" {
			os.RemoveAll(filepath.Dir(p))
		}
	}
	os.Exit(code)
}
