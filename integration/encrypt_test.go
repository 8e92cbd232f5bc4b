package integration

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/overlay/crypt"
	"github.com/dnplabs/docker-net-plugin/store"
)

const (
	encSubnet   = "10.80.0.0/24"
	plainSubnet = "10.81.0.0/24"
	// encPattern fills the payload of the pings on the encrypted overlay
	// (busybox ping -p); plainPattern those on the plain one.
	encPattern   = "a5"
	plainPattern = "5a"
	// encRekey is the rekey interval of the tests: several rekeys happen
	// during one ping run.
	encRekey = 2 * time.Second
	// encPort is the plugin's default --encrypt-port.
	encPort = 4797
)

// TestEncryptedOverlay: three hosts with -o encrypted overlays, on etcd
// (every check) and on ZooKeeper (the basics): containers on different
// hosts talk; the underlay never carries their traffic in clear, nor any
// VXLAN of the encrypted overlay, and full-size pings pass unfragmented;
// hosts must agree on encryption; cleartext VXLAN injected from the
// underlay never reaches a container, on any overlay, unless it comes from
// a member host of a plain overlay; several rekeys, a plugin kill -9 and a
// host down meanwhile lose no ping, and the host that was down is back in
// step within seconds.
func TestEncryptedOverlay(t *testing.T) {
	t.Run("etcd", func(t *testing.T) { testEncryptedOverlay(t, "etcd", true) })
	t.Run("zk", func(t *testing.T) { testEncryptedOverlay(t, "zk", false) })
}

func testEncryptedOverlay(t *testing.T, kind string, full bool) {
	c := harness.New(t, 3, harness.Options{})
	url, st := kvServer(t, c, kind)
	relRemoveContainersFirst(t, c)
	h1, h2, h3 := c.Hosts[0], c.Hosts[1], c.Hosts[2]
	flags := []string{"--rekey-interval", encRekey.String()}
	if full {
		// A pre-shared secret on every host (mixed into the keys).
		psk := filepath.Join(c.Dir, "psk")
		if err := os.WriteFile(psk, []byte("a secret every host has, and the store does not\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		flags = append(flags, "--psk-file", psk)
	}
	plugins := map[*harness.Host]*plugin{}
	for _, h := range c.Hosts {
		plugins[h] = startPlugin(t, c, h, url, flags...)
	}
	create := func(h *harness.Host, name, subnet string, opts ...string) (string, error) {
		args := []string{"network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--subnet", subnet, "-o", "overlay=" + name}
		for _, o := range opts {
			args = append(args, "-o", o)
		}
		return h.Docker(append(args, name)...)
	}
	for _, h := range c.Hosts {
		if _, err := create(h, "sec", encSubnet, "encrypted"); err != nil {
			t.Fatal(err)
		}
	}
	ips := map[*harness.Host]string{}
	for _, h := range c.Hosts {
		ips[h] = runContainer(t, h, "s-"+h.Name, "sec")
		if mtu := h.MustDocker(t, "exec", "s-"+h.Name, "cat", "/sys/class/net/eth0/mtu"); mtu != "1410" {
			t.Errorf("%s: container MTU %s on the encrypted overlay, want 1410 (1500 - 50 VXLAN - 40 encryption)", h.Name, mtu)
		}
	}
	for _, from := range c.Hosts {
		for _, to := range c.Hosts {
			if from != to {
				pingEventually(t, from, "s-"+from.Name, ips[to])
			}
		}
	}
	t.Logf("sec (encrypted): every pair of hosts pings both ways: %v", values(map[string]string{"h1": ips[h1], "h2": ips[h2], "h3": ips[h3]}))

	// What crosses the underlay: pings with a payload pattern, full size,
	// on the encrypted overlay; and on a plain overlay, whose pattern the
	// capture must find (else it would prove nothing).
	var openIP2 string
	for _, h := range []*harness.Host{h1, h2} {
		if _, err := create(h, "open", plainSubnet); err != nil {
			t.Fatal(err)
		}
		openIP2 = runContainer(t, h, "o-"+h.Name, "open")
	}
	pingEventually(t, h1, "o-h1", openIP2)
	capture := testenv.StartCapture(t, c.SwitchNetNS)
	full1410 := strconv.Itoa(1410 - 28)
	for _, p := range []struct {
		h       *harness.Host
		ctr, ip string
		pattern string
	}{
		{h1, "s-h1", ips[h2], encPattern}, {h3, "s-h3", ips[h1], encPattern}, {h1, "o-h1", openIP2, plainPattern},
	} {
		out, err := p.h.Docker("exec", p.ctr, "ping", "-q", "-c", "10", "-i", "0.1", "-W", "2", "-s", full1410, "-p", p.pattern, p.ip)
		if err != nil || !strings.Contains(out, "10 packets received") {
			t.Errorf("%s: full-size pings %s -> %s: %v\n%s", p.h.Name, p.ctr, p.ip, err, out)
		}
	}
	capture.Stop()
	checkUnderlay(t, capture, true)

	// Hosts must agree: the encrypted overlay cannot be joined without
	// -o encrypted, the plain one not with it.
	if out, err := create(h3, "open", plainSubnet, "encrypted"); err == nil || !strings.Contains(err.Error(), "already exists unencrypted") {
		t.Errorf("encrypted network on the plain overlay: %q, %v; want it refused", out, err)
	}
	if out, err := create(h3, "sec", encSubnet); err == nil {
		t.Errorf("plain network on the encrypted overlay: %q; want it refused", out)
	}
	if !full {
		// Everything goes; nothing stays: no overlay or crypt namespace,
		// no data path.
		for _, h := range c.Hosts {
			if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
				h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
			}
			for _, n := range []string{"sec", "open"} {
				if _, err := h.Docker("network", "inspect", n); err == nil {
					if err := networkRm(h, n); err != nil {
						t.Error(err)
					}
				}
			}
		}
		for _, h := range c.Hosts {
			waitFor(t, 15*time.Second, h.Name+": overlay and crypt namespaces removed", func() bool {
				return len(overlayNamespaces(t, c, h)) == 0
			})
			waitFor(t, 5*time.Second, h.Name+": encryption data path stopped", func() bool {
				cl, err := crypt.Dial(filepath.Join(h.Dir, "state", "crypt.sock"))
				if err == nil {
					cl.Close()
				}
				return err != nil
			})
			assertNoPluginLeftovers(t, h, "10.80.0", "10.81.0")
		}
		return
	}

	// Cleartext VXLAN injected from the underlay: for the plain overlay it
	// reaches the container only from a member host (h2, the control), not
	// from the switch; for the encrypted overlay never, not even from a
	// member host.
	secVNI, openVNI := overlayVNI(t, st, "sec"), overlayVNI(t, st, "open")
	if injectVXLAN(t, h1, "o-h1", "open", openVNI, c.SwitchNetNS, h1.UnderlayIP) {
		t.Error("VXLAN from the switch, not a host of the overlay, reached a container of the plain overlay")
	}
	if !injectVXLAN(t, h1, "o-h1", "open", openVNI, h2.NetNS, h1.UnderlayIP) {
		t.Error("VXLAN from member host h2 did not reach the container: the injection check proves nothing")
	}
	if injectVXLAN(t, h1, "s-h1", "sec", secVNI, h2.NetNS, h1.UnderlayIP) {
		t.Error("cleartext VXLAN for the encrypted overlay reached a container")
	}
	t.Log("injected VXLAN: refused from a non-member; refused in clear for the encrypted overlay; let in from a member of the plain one")

	// Several rekeys in a row with a ping running h1 -> h2, and meanwhile
	// h1's plugin is killed (-9) and restarted, and h3 is down (plugin
	// killed, its data path too) for three rekeys (shorter than the live
	// key's TTL: this is not about host loss). No ping is lost; h1's data
	// path is the same process throughout; h3 is back in step within
	// seconds of its return.
	before := cryptStatus(t, h1)
	pingsDuring := int(5*encRekey/(100*time.Millisecond)) + 10
	run := startPingRun(h1, "s-h1", ips[h2], pingsDuring)
	time.Sleep(500 * time.Millisecond)
	plugins[h3].Crash(t)
	down3 := cryptStatus(t, h3)
	syscall.Kill(down3.PID, syscall.SIGKILL)
	downAt := time.Now()
	plugins[h1].Crash(t)

	// While h3's data path is down nothing of h3 leaves in clear.
	capture = testenv.StartCapture(t, c.SwitchNetNS)
	h3.Docker("exec", "s-h3", "ping", "-q", "-c", "5", "-i", "0.2", "-W", "1", "-p", encPattern, ips[h1])
	capture.Stop()
	if n := capture.Count(bytes.Repeat([]byte{0xa5}, 32)); n > 0 {
		t.Errorf("with h3's data path down, %d frames carried the ping pattern in clear", n)
	}
	if d := 3*time.Second - time.Since(downAt); d > 0 {
		time.Sleep(d)
	}
	plugins[h1].Start(t)

	// h3 comes back after three rekeys.
	for crypt.Epoch(time.Now(), encRekey) < down3.Epoch+3 {
		time.Sleep(100 * time.Millisecond)
	}
	missed := crypt.Epoch(time.Now(), encRekey) - down3.Epoch
	plugins[h3].Start(t)
	back := time.Now()
	waitFor(t, 30*time.Second, "h3 reaches h1 on the encrypted overlay", func() bool {
		ok, _ := ping(h3, "s-h3", ips[h1])
		return ok
	})
	backIn := time.Since(back)
	pingEventually(t, h1, "s-h1", ips[h3])
	t.Logf("h3 was down %s (%d rekeys); back in step %s after its plugin started", back.Sub(downAt).Round(time.Millisecond), missed, backIn.Round(time.Millisecond))

	sent, received := run.wait(t)
	after := cryptStatus(t, h1)
	var rx []uint32 // epochs of the keys h1 accepted from h2 during the run
	for _, p := range after.Peers {
		if p.Addr.String() != h2.UnderlayIP {
			continue
		}
		for _, e := range p.ReceivedEpochs {
			if e >= before.Epoch {
				rx = append(rx, e)
			}
		}
	}
	t.Logf("h1 -> h2 across %d rekeys, a kill -9 of h1's plugin and h3 down: %d sent, %d received; epochs received from h2 %v", len(rx)-1, sent, received, rx)
	if sent != pingsDuring || received != sent {
		t.Errorf("lost %d of %d pings across rekeys and the plugin restart:\n%s", sent-received, sent, run.out)
	}
	if len(rx) < 4 {
		t.Errorf("h1 accepted keys of epochs %v from h2 during %s; want at least 4 epochs (3 rekeys)", rx, time.Duration(pingsDuring)*100*time.Millisecond)
	}
	if after.PID != before.PID || after.Instance != before.Instance {
		t.Errorf("h1's data path changed across its plugin's restart: pid %d -> %d", before.PID, after.PID)
	}
	if took := backIn; took > 15*time.Second {
		t.Errorf("h3 needed %s after its return to reach h1", took)
	}
}

// checkUnderlay fails the test if the capture holds the encrypted pings'
// pattern or VXLAN of the encrypted overlay in clear, or fragments; with
// plain it also wants the plain overlay's pattern (proof the capture saw
// the traffic).
func checkUnderlay(t *testing.T, capture *testenv.Capture, plain bool) {
	t.Helper()
	encClear := bytes.Repeat([]byte{0xa5}, 32)
	plainClear := bytes.Repeat([]byte{0x5a}, 32)
	var encrypted, biggest, plainSeen int
	for _, f := range capture.Frames() {
		if bytes.Contains(f, encClear) {
			t.Fatalf("the encrypted overlay's ping pattern crossed the underlay in clear: % x", f[:min(len(f), 96)])
		}
		if bytes.Contains(f, plainClear) {
			plainSeen++
		}
		ip, udp, ok := frameIPv4UDP(f)
		if !ok {
			continue
		}
		if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
			t.Errorf("fragment on the underlay: % x", f[:min(len(f), 64)])
		}
		if binary.BigEndian.Uint16(udp[2:]) == encPort {
			encrypted++
			biggest = max(biggest, len(ip))
		}
	}
	if encrypted == 0 || biggest != 1500 {
		t.Errorf("%d encrypted packets on the underlay, the biggest %d bytes; want full-size pings as 1500-byte packets", encrypted, biggest)
	}
	if plain && plainSeen == 0 {
		t.Error("the capture did not see the plain overlay's ping pattern: it proves nothing")
	}
	t.Logf("underlay: %d encrypted packets (biggest %d bytes), no cleartext of the encrypted overlay, no fragments; plain overlay's pattern seen in %d frames", encrypted, biggest, plainSeen)
}

func frameIPv4UDP(f []byte) (ip, udp []byte, ok bool) {
	if len(f) < 14+28 || f[12] != 0x08 || f[13] != 0x00 {
		return nil, nil, false
	}
	ip = f[14:]
	if ip[0]>>4 != 4 || ip[9] != 17 {
		return nil, nil, false
	}
	total, ihl := int(binary.BigEndian.Uint16(ip[2:])), int(ip[0]&0x0f)*4
	if total > len(ip) || total < ihl+8 {
		return nil, nil, false
	}
	return ip[:total], ip[ihl:total], true
}

// overlayVNI reads an overlay's VNI from the store.
func overlayVNI(t *testing.T, st store.Store, name string) uint32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	kv, err := st.Get(ctx, driver.OverlayKey(name))
	if err != nil {
		t.Fatal(err)
	}
	var rec struct {
		VNI uint32 `json:"vni"`
	}
	if err := json.Unmarshal(kv.Value, &rec); err != nil || rec.VNI == 0 {
		t.Fatalf("overlay %s record %s: %v", name, kv.Value, err)
	}
	return rec.VNI
}

// injectVXLAN sends, from a socket in namespace fromNS, cleartext VXLAN
// packets for vni to dst:4789 whose frame is addressed to the container
// (its MAC and IP on network), and reports whether the frame reached it.
func injectVXLAN(t *testing.T, h *harness.Host, container, network string, vni uint32, fromNS, dst string) bool {
	t.Helper()
	pid := h.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", container)
	ip := h.MustDocker(t, "inspect", "-f", `{{(index .NetworkSettings.Networks "`+network+`").IPAddress}}`, container)
	macs := h.MustDocker(t, "inspect", "-f", `{{(index .NetworkSettings.Networks "`+network+`").MacAddress}}`, container)
	mac, err := net.ParseMAC(macs)
	if err != nil {
		t.Fatalf("%s: MAC %q: %v", container, macs, err)
	}
	ctrNS := "/proc/" + pid + "/ns/net"
	marker := []byte(testenv.RandomName("dnp-injected-"))
	seen := testenv.StartCapture(t, ctrNS)
	src := netip.AddrPortFrom(netip.MustParseAddr(ip).Prev(), 5555) // an address of the subnet
	pkt := testenv.VXLANPacket(vni, mac, net.HardwareAddr{0x02, 0x66, 0x66, 0x66, 0x66, 0x66},
		src, netip.AddrPortFrom(netip.MustParseAddr(ip), 9999), marker)
	if err := testenv.SendUDP(fromNS, netip.AddrPortFrom(netip.MustParseAddr(dst), 4789), pkt, 5); err != nil {
		t.Fatalf("inject from %s: %v", fromNS, err)
	}
	time.Sleep(300 * time.Millisecond)
	seen.Stop()
	return seen.Count(marker) > 0
}

// cryptStatus asks h's encryption data path (legacy plugin: its state dir
// is <host dir>/state) for its state.
func cryptStatus(t *testing.T, h *harness.Host) *crypt.Status {
	t.Helper()
	cl, err := crypt.Dial(filepath.Join(h.Dir, "state", "crypt.sock"))
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	defer cl.Close()
	st, err := cl.Status()
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	return st
}
