package integration

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestMain removes what the tests built once per binary (the plugin binary
// and the managed plugin's directories) when they are done.
func TestMain(m *testing.M) {
	code := m.Run()
	harness.RemovePluginBinary()
	for _, dir := range []string{pluginDir, upgradeDir} {
		if dir != "" {
			os.RemoveAll(filepath.Dir(dir))
		}
	}
	os.Exit(code)
}
