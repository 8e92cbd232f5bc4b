package overlay_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/testenv"
	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/overlay/crypt"
)

// TestMain lets the test binary be the encryption data path the tests
// start (overlay.Encryption.Command is the test binary itself).
func TestMain(m *testing.M) {
	if os.Getenv(crypt.ConfigEnv) != "" {
		ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
		defer stop()
		if err := crypt.RunFromEnv(ctx); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const testCryptPort = 4797

// encrypt sets up h for encrypted networks and returns its public key.
func encrypt(t *testing.T, h *testHost, interval time.Duration) string {
	t.Helper()
	testenv.NeedRoot(t)
	if err := overlay.EncryptionAvailable(); err != nil {
		testenv.Missing(t, "%v", err)
	}
	dir := t.TempDir()
	h.host.Encryption = &overlay.Encryption{
		Command:  []string{os.Args[0]},
		StateDir: dir, KeyFile: filepath.Join(dir, "host-key"),
		Port: testCryptPort, RekeyInterval: interval,
		LogFile: filepath.Join(dir, "crypt.log"), LogLevel: "debug",
	}
	k, err := crypt.LoadOrCreateKey(h.host.Encryption.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(h.host.Encryption.LogFile)
			t.Logf("data path log of %s:\n%s", h.ip, b)
		}
	})
	return crypt.EncodePublic(k.PublicKey())
}

// endpointOn adds an endpoint with a container holding ip/24 to n on h.
func endpointOn(t *testing.T, h *testHost, n *overlay.Network, id, macAddr, ip string) (*testenv.NetNS, overlay.Peer) {
	t.Helper()
	m := mac(t, macAddr)
	hostIf, err := n.AddEndpoint(overlay.Endpoint{ID: id, MAC: m})
	if err != nil {
		t.Fatal(err)
	}
	c := container(t, h, hostIf, ip+"/24")
	return c, overlay.Peer{HostIP: h.ip, MAC: m, IPs: []netip.Addr{netip.MustParseAddr(ip)}}
}

// pingRun pings ip from c count times, interval seconds apart, with the
// payload filled with pattern; it returns how many replies came.
func pingRun(c *testenv.NetNS, ip string, count int, interval string, size int, pattern string) (int, string) {
	args := []string{"busybox", "ping", "-q", "-c", fmt.Sprint(count), "-i", interval, "-W", "2", "-s", fmt.Sprint(size)}
	if pattern != "" {
		args = append(args, "-p", pattern)
	}
	out, _ := c.Exec(append(args, ip)...)
	var sent, got int
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "packets transmitted") {
			fmt.Sscanf(strings.TrimSpace(line), "%d packets transmitted, %d packets received", &sent, &got)
		}
	}
	return got, out
}

// TestEncryptedNetwork: two hosts with an encrypted network and a plain
// one, a third host on the underlay that is a member of neither.
func TestEncryptedNetwork(t *testing.T) {
	hs := newHosts(t, 3)
	a, b, x := hs[0], hs[1], hs[2]
	const interval = 2 * time.Second
	keyA, keyB := encrypt(t, a, interval), encrypt(t, b, interval)
	const vni = 5001
	nets := map[*testHost]*overlay.Network{}
	for _, h := range []*testHost{a, b} {
		n, err := h.host.EnsureNetwork(overlay.NetworkConfig{ID: "enc", VNI: vni, LocalIP: h.ip, Encrypted: true})
		if err != nil {
			t.Fatal(err)
		}
		nets[h] = n
	}

	// MTU: underlay 1500 - VXLAN 50 - encryption 40.
	if nets[a].MTU != 1500-50-overlay.EncryptionOverhead || !nets[a].Encrypted {
		t.Fatalf("encrypted network: MTU %d encrypted %v; want %d true", nets[a].MTU, nets[a].Encrypted, 1500-50-overlay.EncryptionOverhead)
	}
	st, err := nets[a].State()
	if err != nil {
		t.Fatal(err)
	}
	if !st.Encrypted || st.SocketNS != "crypt" || !st.Filter.Filtered || len(st.Filter.Members) != 0 {
		t.Fatalf("state: encrypted %v socket in %q filter %+v; want true, crypt, filtered with no members", st.Encrypted, st.SocketNS, st.Filter)
	}
	// No VXLAN socket in the host namespace; the data path's socket is there.
	if out := a.ns.MustExec("ss", "-Hlun"); strings.Contains(out, ":4789 ") || !strings.Contains(out, fmt.Sprintf(":%d ", testCryptPort)) {
		t.Fatalf("host namespace UDP sockets: %q; want %d and no 4789", out, testCryptPort)
	}
	if ids, _ := a.host.ListNetworks(); !slices.Equal(ids, []string{"enc"}) {
		t.Fatalf("ListNetworks = %v; the crypt namespace is not a network", ids)
	}

	ca, pa := endpointOn(t, a, nets[a], "epa0000001", "02:00:00:00:50:01", "10.50.0.1")
	cb, pb := endpointOn(t, b, nets[b], "epb0000001", "02:00:00:00:50:02", "10.50.0.2")
	for _, h := range []*testHost{a, b} {
		if _, err := nets[h].SetPeers([]overlay.Peer{pa, pb}, nil); err != nil {
			t.Fatal(err)
		}
	}
	capture := testenv.StartCapture(t, a.ul.Bridge.Path())
	const pattern = "a5"
	clear := bytes.Repeat([]byte{0xa5}, 32)

	// Keys missing: nothing passes, nothing leaves in clear.
	if got, out := pingRun(ca, "10.50.0.2", 3, "0.2", 56, pattern); got != 0 {
		t.Fatalf("ping without keys answered: %s", out)
	}
	if err := a.host.SetHostKeys(map[netip.Addr]string{b.ip: keyB}); err != nil {
		t.Fatal(err)
	}
	if err := b.host.SetHostKeys(map[netip.Addr]string{a.ip: keyA}); err != nil {
		t.Fatal(err)
	}
	mustPing(t, ca, "10.50.0.2")
	mustPing(t, cb, "10.50.0.1")

	// Full-MTU pings pass, across several rekeys, none lost.
	size := nets[a].MTU - 28
	if got, out := pingRun(ca, "10.50.0.2", 70, "0.1", size, pattern); got != 70 {
		t.Errorf("%d of 70 full-size pings across rekeys answered:\n%s", got, out)
	}
	stA, err := a.host.EncryptionStatus()
	if err != nil {
		t.Fatal(err)
	}
	if len(stA.Peers) != 1 || len(stA.Peers[0].ReceivedEpochs) < 3 || len(stA.Peers[0].SentEpochs) < 3 {
		t.Errorf("a's data path over 7s with %s epochs: %+v; want keys of at least 3 epochs each way", interval, stA.Peers)
	}
	t.Logf("a's data path: epochs sent %v received %v, counters %v", stA.Peers[0].SentEpochs, stA.Peers[0].ReceivedEpochs, stA.Counters)

	// The data path dies: traffic stops (or resumes once the keeper has
	// started it again), and nothing leaves in clear meanwhile.
	if err := syscall.Kill(stA.PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	pingRun(ca, "10.50.0.2", 10, "0.1", 56, pattern)
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := a.host.EncryptionStatus()
		if err == nil && st.PID != stA.PID {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("data path not restarted within 10s: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	mustPing(t, ca, "10.50.0.2")

	// What crossed the underlay: no cleartext, no VXLAN, no fragments,
	// and encrypted packets as big as the underlay allows.
	capture.Stop()
	frames := capture.Frames()
	var encrypted, biggest int
	for _, f := range frames {
		if bytes.Contains(f, clear) {
			t.Fatalf("the ping pattern crossed the underlay in clear: % x", f[:min(len(f), 96)])
		}
		ip, udp, ok := ipv4UDP(f)
		if !ok {
			continue
		}
		if binary.BigEndian.Uint16(ip[6:])&0x3fff != 0 {
			t.Errorf("fragmented packet on the underlay: % x", f[:min(len(f), 64)])
		}
		switch binary.BigEndian.Uint16(udp[2:]) {
		case 4789:
			t.Errorf("VXLAN in clear on the underlay: % x", f[:min(len(f), 64)])
		case testCryptPort:
			encrypted++
			biggest = max(biggest, len(ip))
		}
	}
	if encrypted == 0 || biggest != 1500 {
		t.Errorf("%d encrypted packets on the underlay, the biggest %d bytes; want some of 1500", encrypted, biggest)
	}
	t.Logf("underlay: %d frames, %d encrypted packets (biggest %d bytes), no cleartext", len(frames), encrypted, biggest)

	// Cleartext VXLAN for the encrypted VNI, even from a member host,
	// never reaches the container.
	inject := func(from *testHost, to *testHost, vni uint32, dst *testenv.NetNS, dstMAC, dstIP string) bool {
		t.Helper()
		marker := []byte(testenv.RandomName("dnp-injected-"))
		seen := testenv.StartCapture(t, dst.Path())
		pkt := testenv.VXLANPacket(vni, mac(t, dstMAC), mac(t, "02:66:66:66:66:66"),
			netip.MustParseAddrPort("10.50.0.66:5555"), netip.AddrPortFrom(netip.MustParseAddr(dstIP), 9999), marker)
		if err := testenv.SendUDP(from.ns.Path(), netip.AddrPortFrom(to.ip, 4789), pkt, 5); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		seen.Stop()
		return seen.Count(marker) > 0
	}
	if inject(b, a, vni, ca, "02:00:00:00:50:01", "10.50.0.1") {
		t.Error("cleartext VXLAN for the encrypted network reached the container")
	}

	// A plain network: the filter lets in its member hosts' VXLAN only.
	const plainVNI = 5002
	for _, h := range []*testHost{a, b} {
		n, err := h.host.EnsureNetwork(overlay.NetworkConfig{ID: "plain", VNI: plainVNI, LocalIP: h.ip})
		if err != nil {
			t.Fatal(err)
		}
		nets[h] = n
	}
	ca2, pa2 := endpointOn(t, a, nets[a], "epa0000002", "02:00:00:00:51:01", "10.51.0.1")
	cb2, pb2 := endpointOn(t, b, nets[b], "epb0000002", "02:00:00:00:51:02", "10.51.0.2")
	for _, h := range []*testHost{a, b} {
		if _, err := nets[h].SetPeers([]overlay.Peer{pa2, pb2}, nil); err != nil {
			t.Fatal(err)
		}
	}
	mustPing(t, ca2, "10.51.0.2")
	mustPing(t, cb2, "10.51.0.1")
	if st, _ := nets[a].State(); st.Encrypted || st.SocketNS != "host" || !slices.Equal(st.Filter.Members, []netip.Addr{b.ip}) {
		t.Fatalf("plain network state: encrypted %v socket %q filter %+v; want false, host, members [%s]", st.Encrypted, st.SocketNS, st.Filter, b.ip)
	}
	if inject(x, a, plainVNI, ca2, "02:00:00:00:51:01", "10.51.0.1") {
		t.Error("VXLAN from a host that is not a member reached the container")
	}
	if !inject(b, a, plainVNI, ca2, "02:00:00:00:51:01", "10.51.0.1") {
		t.Error("the same VXLAN from the member host did not reach the container: the check proves nothing")
	}

	// A new data path takes over from the running one without losing a
	// packet (make-before-break, as a plugin upgrade does): twice in a
	// row, with pings 5 ms apart meanwhile (stopping the old one before
	// starting the new one loses a few).
	const across = 400
	pings := make(chan string, 1)
	go func() {
		got, out := pingRun(ca, "10.50.0.2", across, "0.005", 56, "")
		pings <- fmt.Sprintf("%d %s", got, out)
	}()
	time.Sleep(300 * time.Millisecond)
	for i := range 2 {
		takeOver(t, a, fmt.Sprintf("successor-%d", i))
	}
	if res := <-pings; !strings.HasPrefix(res, fmt.Sprint(across)+" ") {
		t.Errorf("pings across two takeovers of the data path: want all %d back, got %s", across, res)
	}

	// A restarted plugin keeps the running data path if it has the same
	// settings, and replaces it if not (here: another rekey interval).
	st0, err := a.host.EncryptionStatus()
	if err != nil {
		t.Fatal(err)
	}
	same := &overlay.Host{NetNS: a.host.NetNS, Prefix: a.host.Prefix, Encryption: a.host.Encryption}
	if err := same.StartEncryption(a.ip); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.host.EncryptionStatus(); st == nil || st.PID != st0.PID {
		t.Fatalf("a restart with the same settings replaced the data path (pid %d -> %v)", st0.PID, st)
	}
	other := *a.host.Encryption
	other.RekeyInterval = 3 * time.Second
	changed := &overlay.Host{NetNS: a.host.NetNS, Prefix: a.host.Prefix, Encryption: &other}
	if err := changed.StartEncryption(a.ip); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.host.EncryptionStatus(); st == nil || st.PID == st0.PID || st.Interval != "3s" || len(st.VNIs) != 1 || len(st.Peers) != 1 {
		t.Fatalf("a restart with another rekey interval: data path %+v; want a new one with 3s, which took up the saved VNI and key", st)
	}
	back := &overlay.Host{NetNS: a.host.NetNS, Prefix: a.host.Prefix, Encryption: a.host.Encryption}
	if err := back.StartEncryption(a.ip); err != nil {
		t.Fatal(err)
	}
	if st, _ := a.host.EncryptionStatus(); st == nil || st.Interval != "2s" {
		t.Fatalf("back to the first settings: data path %+v; want 2s", st)
	}
	mustPing(t, ca, "10.50.0.2")

	// Removing the networks removes the filter, the data path and the
	// crypt namespace.
	for _, h := range []*testHost{a, b} {
		for _, id := range []string{"enc", "plain"} {
			if err := h.host.DeleteNetwork(id); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, err := os.Stat(filepath.Join(overlay.DefaultDir, a.host.Prefix+"crypt")); !os.IsNotExist(err) {
		t.Errorf("crypt namespace left: %v", err)
	}
	if _, err := a.host.EncryptionStatus(); err == nil {
		t.Error("data path still answers after the last encrypted network went")
	}
	if out := a.ns.MustExec("ss", "-Hlun"); strings.TrimSpace(out) != "" {
		t.Errorf("UDP sockets left in the host namespace: %q", out)
	}
}

// takeOver starts a data path on h with the running one's configuration
// (read from its environment) and crypt.Config.Takeover, and waits until it
// answers in its place.
func takeOver(t *testing.T, h *testHost, tag string) {
	t.Helper()
	st, err := h.host.EncryptionStatus()
	if err != nil {
		t.Fatal(err)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", st.PID))
	if err != nil {
		t.Fatal(err)
	}
	var cfg crypt.Config
	for _, kv := range strings.Split(string(env), "\x00") {
		if v, ok := strings.CutPrefix(kv, crypt.ConfigEnv+"="); ok {
			if err := json.Unmarshal([]byte(v), &cfg); err != nil {
				t.Fatal(err)
			}
		}
	}
	cfg.Takeover, cfg.Tag = true, tag
	b, _ := json.Marshal(cfg)
	log, err := os.OpenFile(h.host.Encryption.LogFile, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), crypt.ConfigEnv+"="+string(b))
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go cmd.Wait()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if now, err := h.host.EncryptionStatus(); err == nil && now.Tag == tag {
			if now.PID == st.PID || len(now.VNIs) != len(st.VNIs) || len(now.Peers) != len(st.Peers) {
				t.Fatalf("data path after the takeover: %+v; want a new process with the VNIs and hosts of %+v", now, st)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the data path started to take over (%s) does not answer after 10s", tag)
		}
	}
}

// ipv4UDP finds the IPv4 header and UDP header of an Ethernet frame.
func ipv4UDP(f []byte) (ip, udp []byte, ok bool) {
	if len(f) < 14+20+8 || f[12] != 0x08 || f[13] != 0x00 {
		return nil, nil, false
	}
	ip = f[14:]
	if ip[0]>>4 != 4 || ip[9] != 17 {
		return nil, nil, false
	}
	total := int(binary.BigEndian.Uint16(ip[2:]))
	ihl := int(ip[0]&0x0f) * 4
	if total > len(ip) || total < ihl+8 {
		return nil, nil, false
	}
	return ip[:total], ip[ihl:total], true
}
