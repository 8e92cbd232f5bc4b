package testenv

import (
	"os"
	"path/filepath"
	"testing"
)

// A ZooKeeper server stopped between creating a new transaction log and
// writing its header (seen in CI: an outage test stopped the server just
// after a client's first session) must start again with its data.
func TestZooKeeperStartsAfterATornLog(t *testing.T) {
	srv := StartZooKeeper(t, ServerOptions{})
	srv.Stop(t)
	logs, _ := filepath.Glob(filepath.Join(srv.Dir, "data", "version-2", "log.*"))
	torn := filepath.Join(srv.Dir, "data", "version-2", "log.7fffffff")
	if err := os.WriteFile(torn, []byte{0x5a, 0x4b}, 0o644); err != nil {
		t.Fatal(err)
	}
	srv.Start(t)
	if _, err := os.Stat(torn); !os.IsNotExist(err) {
		t.Errorf("the torn log is still there (%v); the logs before: %v", err, logs)
	}
}
