package dockerrun

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/dnplabs/docker-net-plugin/overlay/crypt"
)

const testID = "91f64bb1477b36c53e3661bbdae0b995bf2a5b2cd13930574e5a541c169c2930"

// A managed plugin's mount table as seen on Docker 28.5 (shortened).
var mountinfo = `222 145 254:0 /tmp/x/h1/data/plugins/` + testID + `/rootfs / rw,relatime - ext4 /dev/vda rw
240 222 254:0 /tmp/x/h1/data/plugins/` + testID + `/propagated-mount /run/dnp rw,relatime shared:37 - ext4 /dev/vda rw
243 222 254:0 /tmp/x/h1/shared /var/lib/docker-net-plugin rw,relatime shared:36 - ext4 /dev/vda rw
244 222 254:0 /tmp/x/h1/plugins/` + testID + ` /run/docker/plugins rw,relatime shared:76 - ext4 /dev/vda rw
`

func TestPluginID(t *testing.T) {
	id, err := pluginIDFrom([]byte(mountinfo))
	if err != nil || id != testID {
		t.Fatalf("plugin id %q, %v; want %s", id, err, testID)
	}
	// A plain process (legacy plugin): no plugin directory mounted.
	legacy := "22 1 254:0 / / rw - ext4 /dev/vda rw\n30 22 0:25 / /run rw - tmpfs tmpfs rw\n"
	if id, err := pluginIDFrom([]byte(legacy)); err == nil {
		t.Fatalf("plugin id %q from a legacy process's mounts; want an error", id)
	}
	// A directory that is not named after an ID does not count.
	odd := "244 222 254:0 /run/docker/plugins /run/docker/plugins rw - tmpfs tmpfs rw\n"
	if id, err := pluginIDFrom([]byte(odd)); err == nil {
		t.Fatalf("plugin id %q from %q; want an error", id, odd)
	}
}

func TestBinds(t *testing.T) {
	// docker plugin inspect's Settings.Mounts of config.json's mounts.
	var mounts []pluginMount
	err := json.Unmarshal([]byte(`[
		{"Name":"config","Source":"/etc/dnp","Destination":"/etc/docker-net-plugin","Type":"bind","Options":["rbind","ro"]},
		{"Name":"dockersock","Source":"/var/run/docker.sock","Destination":"/run/docker.sock","Type":"bind","Options":["rbind"]},
		{"Name":"state","Source":"/srv/dnp","Destination":"/var/lib/docker-net-plugin","Type":"bind","Options":["rbind","rshared"]}]`), &mounts)
	if err != nil {
		t.Fatal(err)
	}
	st := "/var/lib/docker-net-plugin"
	cfg := crypt.Config{
		CryptNetNS: st + "/netns/dnp-crypt", Control: st + "/crypt.sock", StateFile: st + "/crypt-state.json",
		KeyFile: st + "/host-key",
	}
	got, err := binds(mounts, cfg)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(got)
	want := `[{"Type":"bind","Source":"/srv/dnp","Target":"/var/lib/docker-net-plugin","BindOptions":{"Propagation":"rslave"}}]`
	if string(b) != want {
		t.Errorf("binds %s; want %s", b, want)
	}

	// A pre-shared secret in the config mount: that one too, read-only.
	cfg.PSKFile = "/etc/docker-net-plugin/psk"
	got, err = binds(mounts, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[1].Source != "/etc/dnp" || !got[1].ReadOnly || got[1].BindOptions != nil {
		t.Errorf("binds with a PSK %+v; want the state mount and the config mount read-only", got)
	}

	// A file inside the plugin's rootfs cannot be reached from outside.
	cfg.PSKFile = "/psk"
	if _, err := binds(mounts, cfg); err == nil || !strings.Contains(err.Error(), "/psk") {
		t.Errorf("binds with a PSK in the rootfs: %v; want an error naming it", err)
	}
	// Nor can a destination that only shares a prefix.
	cfg.PSKFile = "/etc/docker-net-plugin-other/psk"
	if _, err := binds(mounts, cfg); err == nil {
		t.Error("binds of /etc/docker-net-plugin-other: want an error")
	}
}
