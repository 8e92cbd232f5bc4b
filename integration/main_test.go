package integration

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestMain removes what the tests built once per binary (the plugin binary
// and the managed plugin's directory) when they are done.
func TestMain(m *testing.M) {
	code := m.Run()
	harness.RemovePluginBinary()
	if pluginDir != "" {
		os.RemoveAll(filepath.Dir(pluginDir))
	}
	os.Exit(code)
}
