package driver

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/docker/go-plugins-helpers/network"

	"github.com/dnplabs/docker-net-plugin/store"
)

// logBuf is a log sink tests can read while the driver writes.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) count(substr string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), substr)
}

// fakeMetrics records what the driver reports of skipped records.
type fakeMetrics struct {
	mu                   sync.Mutex
	invalid, conflicting int
}

func (m *fakeMetrics) Reconciled(int, error) {}
func (m *fakeMetrics) Known(int, int, int)   {}
func (m *fakeMetrics) Skipped(i, c int)      { m.mu.Lock(); m.invalid, m.conflicting = i, c; m.mu.Unlock() }
func (m *fakeMetrics) get() (invalid, c int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.invalid, m.conflicting
}
func (m *fakeMetrics) String() string {
	i, c := m.get()
	return fmt.Sprintf("invalid %d, conflict %d", i, c)
}
func (m *fakeMetrics) is(invalid, c int) bool { i, cc := m.get(); return i == invalid && cc == c }

// newObservedHost is newHost with its log and metrics kept for the test.
func newObservedHost(t *testing.T, s store.Store, addr string) (*testHost, *logBuf, *fakeMetrics) {
	ctx, cancel := context.WithCancel(context.Background())
	p := newFakePlane()
	lb, m := &logBuf{}, &fakeMetrics{}
	d := New(Config{Store: s, Plane: p, HostAddr: netip.MustParseAddr(addr), Metrics: m,
		Log: slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	d.Start(ctx)
	t.Cleanup(func() { cancel(); <-d.Done() })
	return &testHost{d: d, plane: p, stop: cancel}, lb, m
}

func createEP(h *testHost, netID, epID, addr, mac string) error {
	_, err := h.d.CreateEndpoint(context.Background(), &network.CreateEndpointRequest{NetworkID: netID, EndpointID: epID,
		Interface: &network.EndpointInterface{Address: addr, MacAddress: mac}})
	return err
}

func overlayRec(t *testing.T, s store.Store, name string) (overlayRecord, bool) {
	t.Helper()
	kv, err := s.Get(context.Background(), overlayKey(name))
	if errors.Is(err, store.ErrNotFound) {
		return overlayRecord{}, false
	}
	if err != nil {
		t.Fatal(err)
	}
	rec, err := decodeKV[overlayRecord](kv)
	if err != nil {
		t.Fatal(err)
	}
	return rec, true
}

// Two Docker networks of one host on one overlay (two Compose projects
// with the same networks: block): removing one keeps the overlay, its VNI
// and its subnet for the other, also after a restart of the plugin; the
// overlay goes with the last network.
func TestTwoNetworksOfOneHostOnOneOverlay(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	opts := map[string]string{"overlay": "blue"}
	for _, id := range []string{"projA", "projB"} {
		if err := a.d.CreateNetwork(ctx, createReq(id, "10.20.0.0/24", opts)); err != nil {
			t.Fatal(err)
		}
	}
	rec, _ := overlayRec(t, s, "blue")
	if !slices.Equal(rec.Hosts, []string{"192.0.2.1"}) || !slices.Equal(rec.Members["192.0.2.1"].Networks, []string{"projA", "projB"}) {
		t.Fatalf("overlay blue: hosts %v, members %+v; want host a with both networks", rec.Hosts, rec.Members)
	}
	if err := a.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "projA"}); err != nil {
		t.Fatal(err)
	}
	if rec, ok := overlayRec(t, s, "blue"); !ok || !slices.Equal(rec.Members["192.0.2.1"].Networks, []string{"projB"}) {
		t.Fatalf("after projA went: overlay blue %+v (present %v); want it held by projB", rec, ok)
	}
	if err := b.d.CreateNetwork(ctx, createReq("other", "10.30.0.0/24", opts)); err == nil || !strings.Contains(err.Error(), "already exists with subnets") {
		t.Fatalf("another subnet on overlay blue while projB uses it: %v", err)
	}
	// A new process, nothing in memory: projB still gets endpoints.
	a.stop()
	<-a.d.Done()
	a2 := newHost(t, s, "192.0.2.1")
	joinEP(t, a2, "projB", "ep1aaaaa", "10.20.0.2/24")
	leaveEP(t, a2, "projB", "ep1aaaaa")
	if err := a2.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "projB"}); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{overlaysDir, vnisDir, netmapDir, endpointsDir, macsDir, addrsDir} {
		if got := keys(t, s, dir); len(got) != 0 {
			t.Errorf("%s left after the last network went: %v", dir, got)
		}
	}
}

// An overlay record written by the previous version lists hosts only: a
// host listed with two networks in its netmap stays a member until both
// are gone.
func TestMembershipOfAnEarlierVersion(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a := newHost(t, s, "192.0.2.1")
	opts := map[string]string{"overlay": "blue"}
	for _, id := range []string{"n1", "n2"} {
		if err := a.d.CreateNetwork(ctx, createReq(id, "10.20.0.0/24", opts)); err != nil {
			t.Fatal(err)
		}
	}
	// Rewrite the record as the previous version kept it.
	kv, _ := s.Get(ctx, overlayKey("blue"))
	var old map[string]any
	json.Unmarshal(kv.Value, &old)
	delete(old, "members")
	raw, _ := json.Marshal(old)
	if _, err := s.Put(ctx, overlayKey("blue"), raw); err != nil {
		t.Fatal(err)
	}
	a.stop()
	<-a.d.Done()
	a2 := newHost(t, s, "192.0.2.1")
	if err := a2.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "n1"}); err != nil {
		t.Fatal(err)
	}
	rec, ok := overlayRec(t, s, "blue")
	if !ok || !slices.Equal(rec.Hosts, []string{"192.0.2.1"}) || rec.Members["192.0.2.1"] == nil || !slices.Equal(rec.Members["192.0.2.1"].Networks, []string{"n2"}) {
		t.Fatalf("after n1 went: overlay %+v (present %v); want host a a member with n2", rec, ok)
	}
	if err := a2.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "n2"}); err != nil {
		t.Fatal(err)
	}
	if _, ok := overlayRec(t, s, "blue"); ok {
		t.Fatal("overlay left after the last network went")
	}

	// A host gone for good leaves with all its networks at once.
	for _, id := range []string{"n3", "n4"} {
		if err := a2.d.CreateNetwork(ctx, createReq(id, "10.20.0.0/24", opts)); err != nil {
			t.Fatal(err)
		}
	}
	if err := leaveOverlay(ctx, s, "blue", "192.0.2.1"); err != nil {
		t.Fatal(err)
	}
	if _, ok := overlayRec(t, s, "blue"); ok || len(keys(t, s, vnisDir)) != 0 {
		t.Fatal("overlay or VNI left after its only host left")
	}
	// Networks whose overlay went from under them (as the previous version
	// did) can still be removed, after a restart too.
	a2.stop()
	<-a2.d.Done()
	a3 := newHost(t, s, "192.0.2.1")
	if err := createEP(a3, "n3", "ep1", "10.20.0.2/24", ""); err == nil || !strings.Contains(err.Error(), "overlay record is gone") {
		t.Errorf("endpoint on a network whose overlay is gone: %v", err)
	}
	for _, id := range []string{"n3", "n4"} {
		if err := a3.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: id}); err != nil {
			t.Errorf("delete network %s whose overlay is gone: %v", id, err)
		}
	}
	if got := keys(t, s, netmapDir); len(got) != 0 {
		t.Errorf("netmap left: %v", got)
	}
}

// MACs and addresses are claimed with the endpoint record: a second
// endpoint of the overlay with either gets an error naming the holder;
// the claims go with the endpoint.
func TestEndpointClaims(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	opts := map[string]string{"overlay": "blue"}
	for _, h := range []*testHost{a, b} {
		if err := h.d.CreateNetwork(ctx, createReq("n"+h.d.host, "10.20.0.0/24", opts)); err != nil {
			t.Fatal(err)
		}
	}
	if err := createEP(a, "n192.0.2.1", "epa1", "10.20.0.2/24", "02:00:00:00:00:01"); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ addr, mac, want string }{
		{"10.20.0.3/24", "02:00:00:00:00:01", `MAC 02:00:00:00:00:01 is already used on overlay "blue" by endpoint epa1 on host 192.0.2.1`},
		{"10.20.0.2/24", "02:00:00:00:00:02", `address 10.20.0.2 is already used on overlay "blue" by endpoint epa1 on host 192.0.2.1`},
		{"10.20.0.2/24", "", `address 10.20.0.2 is already used on overlay "blue" by endpoint epa1 on host 192.0.2.1`},
		{"10.20.0.3/24", "01:00:5e:00:00:01", "multicast"},
		{"10.20.0.3/24", "ff:ff:ff:ff:ff:ff", "multicast"},
		{"10.20.0.3/24", "00:00:00:00:00:00", "not a usable"},
		{"10.20.0.3/24", "02:00:00:00:00:00:00:01", "6 bytes"},
		{"10.30.0.3/24", "", "outside the subnets"},
		{"10.20.0.3/16", "", "prefix length 16"},
		{"10.20.0.1/24", "", "gateway"},
		{"fd00::3/64", "", "not an IPv4"},
	} {
		err := createEP(b, "n192.0.2.2", "epb1", c.addr, c.mac)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("endpoint %s %s: %v; want an error containing %q", c.addr, c.mac, err, c.want)
		}
	}
	if got := keys(t, s, endpointsDir); !slices.Equal(got, []string{endpointKey("blue", "epa1")}) {
		t.Fatalf("refused endpoints were recorded: %v", got)
	}
	// Another overlay may use the same MAC and address.
	if err := b.d.CreateNetwork(ctx, createReq("red", "10.20.0.0/24", map[string]string{"overlay": "red"})); err != nil {
		t.Fatal(err)
	}
	if err := createEP(b, "red", "epr1", "10.20.0.2/24", "02:00:00:00:00:01"); err != nil {
		t.Fatalf("the same MAC and address on another overlay: %v", err)
	}
	// Deleting an endpoint releases its claims.
	if err := a.d.DeleteEndpoint(ctx, &network.DeleteEndpointRequest{NetworkID: "n192.0.2.1", EndpointID: "epa1"}); err != nil {
		t.Fatal(err)
	}
	if err := createEP(b, "n192.0.2.2", "epb1", "10.20.0.2/24", "02:00:00:00:00:01"); err != nil {
		t.Fatalf("MAC and address after their holder went: %v", err)
	}
	want := []string{macKey("blue", "02:00:00:00:00:01"), macKey("red", "02:00:00:00:00:01")}
	if got := keys(t, s, macsDir); !slices.Equal(got, want) {
		t.Errorf("MAC claims %v, want %v", got, want)
	}
	// A claim left without its endpoint record (an earlier version's) holds nothing.
	if _, err := s.Put(ctx, addrKey("blue", netip.MustParseAddr("10.20.0.9")), claimValue("gone", endpointRecord{Host: "192.0.2.9"})); err != nil {
		t.Fatal(err)
	}
	if err := createEP(a, "n192.0.2.1", "epa2", "10.20.0.9/24", ""); err != nil {
		t.Fatalf("an address whose claim's endpoint is gone: %v", err)
	}
}

// Two endpoints of one overlay never share an address, whatever the IPAM:
// concurrent creations of one address on many hosts, one wins.
func TestAddressClaimUnderConcurrency(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	var hosts []*testHost
	for i := 1; i <= 4; i++ {
		h := newHost(t, s, fmt.Sprintf("192.0.2.%d", i))
		if err := h.d.CreateNetwork(ctx, createReq("n", "10.20.0.0/24", map[string]string{"overlay": "blue"})); err != nil {
			t.Fatal(err)
		}
		hosts = append(hosts, h)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(hosts))
	for i, h := range hosts {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = createEP(h, "n", fmt.Sprintf("ep%d", i), "10.20.0.7/24", "")
		}()
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
		} else if !strings.Contains(err.Error(), "address 10.20.0.7 is already used") {
			t.Errorf("unexpected error: %v", err)
		}
	}
	if ok != 1 || len(keys(t, s, endpointsDir)) != 1 {
		t.Fatalf("%d of %d concurrent creations of one address succeeded (%v); want 1", ok, len(hosts), keys(t, s, endpointsDir))
	}
}

// One bad record costs only itself: a record claiming another endpoint's
// MAC, and a malformed one, are skipped by every host alike (the lowest
// key keeps the MAC), logged once, counted; the rest of the overlay is
// programmed, new endpoints included.
func TestBadRecordCostsOnlyItself(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a := newHost(t, s, "192.0.2.1")
	b := newHost(t, s, "192.0.2.2")
	c, clog, cm := newObservedHost(t, s, "192.0.2.3")
	for _, h := range []*testHost{a, b, c} {
		if err := h.d.CreateNetwork(ctx, createReq("n", "10.20.0.0/24", map[string]string{"overlay": "blue"})); err != nil {
			t.Fatal(err)
		}
	}
	if err := createEP(a, "n", "aaaa1", "10.20.0.2/24", "02:00:00:00:00:01"); err != nil {
		t.Fatal(err)
	}
	joinEP(t, c, "n", "cccc1", "10.20.0.4/24")
	n, _ := c.d.network(ctx, "n")
	vni := n.Overlay.VNI
	// Written behind the plugin's back: b claims a's MAC (its key sorts
	// after a's), and a record with a broadcast MAC.
	put := func(id string, rec endpointRecord) {
		if _, err := s.Put(ctx, endpointKey("blue", id), encode(rec)); err != nil {
			t.Fatal(err)
		}
	}
	put("zzzz1", endpointRecord{Network: "n", Host: "192.0.2.2", IPv4: "10.20.0.50/24", MAC: "02:00:00:00:00:01"})
	put("zzzz2", endpointRecord{Network: "n", Host: "192.0.2.2", IPv4: "10.20.0.51/24", MAC: "ff:ff:ff:ff:ff:ff"})
	if err := createEP(b, "n", "bbbb1", "10.20.0.3/24", ""); err != nil {
		t.Fatal(err)
	}
	eventually(t, "c programs a's and b's good endpoints, and skips the two bad records", func() bool {
		return slices.Equal(c.plane.peerIPs(vni), []string{"10.20.0.2@192.0.2.1", "10.20.0.3@192.0.2.2"}) && cm.is(1, 1)
	})
	// More reconciliations: still logged once each.
	for i := 2; i < 5; i++ {
		if err := createEP(b, "n", fmt.Sprintf("bbbb%d", i), fmt.Sprintf("10.20.0.%d/24", 10+i), ""); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "c programs b's new endpoints", func() bool { return len(c.plane.peerIPs(vni)) == 5 })
	for _, id := range []string{"zzzz1", "zzzz2"} {
		if n := clog.count("endpoint record skipped"); n != 2 || clog.count("endpoint="+id) != 1 {
			t.Errorf("log of c: %d skip lines, %d naming %s; want each skipped record logged once", n, clog.count("endpoint="+id), id)
		}
	}
	// status and doctor show the same two records.
	cs, err := ReadCluster(ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	plan, err := DesiredState(ctx, s, netip.MustParseAddr("192.0.2.3"))
	if err != nil {
		t.Fatal(err)
	}
	for what, ps := range map[string][]RecordProblem{"status": cs.Problems, "doctor": plan.Skipped} {
		if len(ps) != 2 || ps[0].Endpoint != "zzzz1" || ps[0].Kind != SkipConflict || ps[0].ConflictsWith != "aaaa1" || ps[0].ConflictHost != "192.0.2.1" ||
			ps[1].Endpoint != "zzzz2" || ps[1].Kind != SkipInvalid {
			t.Errorf("%s problems %+v; want zzzz1 (conflict with aaaa1) and zzzz2 (invalid)", what, ps)
		}
	}
	// Gone from the store, no longer skipped.
	s.Delete(ctx, endpointKey("blue", "zzzz1"))
	s.Delete(ctx, endpointKey("blue", "zzzz2"))
	eventually(t, "nothing skipped", func() bool { return cm.is(0, 0) && clog.count("endpoint record no longer skipped") == 2 })
}

// A network whose addresses come from another IPAM driver (Docker's
// default one is per host) is refused, unless every host declares a range
// of its own; then its endpoints stay in it.
func TestUncoordinatedIPAM(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	foreign := func(id string, opts map[string]string) *network.CreateNetworkRequest {
		r := createReq(id, "10.88.0.0/24", opts)
		r.IPv4Data[0].AddressSpace = "LocalDefault"
		return r
	}
	err := a.d.CreateNetwork(ctx, foreign("f1", map[string]string{"overlay": "fip"}))
	if err == nil || !strings.Contains(err.Error(), "--ipam-driver") || !strings.Contains(err.Error(), "Docker's default IPAM driver") {
		t.Fatalf("network of Docker's default IPAM: %v; want it refused saying what to type", err)
	}
	if got := keys(t, s, overlaysDir); len(got) != 0 {
		t.Fatalf("a refused network left %v", got)
	}
	if err := a.d.CreateNetwork(ctx, foreign("f1", map[string]string{"overlay": "fip", OptIPAMRange: "10.88.0.0/25"})); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		req  *network.CreateNetworkRequest
		want string
	}{
		{foreign("f2", map[string]string{"overlay": "fip", OptIPAMRange: "10.88.0.64/26"}), "overlaps 10.88.0.0/25, the range host 192.0.2.1 declared"},
		{foreign("f2", map[string]string{"overlay": "fip", OptIPAMRange: "10.99.0.0/25"}), "inside none of the network's subnets"},
		{foreign("f2", map[string]string{"overlay": "fip", OptIPAMRange: "bad"}), "CIDR"},
		{createReq("f2", "10.88.0.0/24", map[string]string{"overlay": "fip"}), "another IPAM driver"},
		{createReq("f2", "10.88.0.0/24", map[string]string{"overlay": "x", OptIPAMRange: "10.88.0.0/25"}), "drop the option"},
	} {
		if err := b.d.CreateNetwork(ctx, c.req); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("create %v: %v; want an error containing %q", c.req.Options, err, c.want)
		}
	}
	if err := b.d.CreateNetwork(ctx, foreign("f2", map[string]string{"overlay": "fip", OptIPAMRange: "10.88.0.128/25"})); err != nil {
		t.Fatal(err)
	}
	if err := createEP(a, "f1", "epa1", "10.88.0.2/24", ""); err != nil {
		t.Fatal(err)
	}
	if err := createEP(b, "f2", "epb1", "10.88.0.130/24", ""); err != nil {
		t.Fatal(err)
	}
	err = createEP(b, "f2", "epb2", "10.88.0.2/24", "")
	if err == nil || !strings.Contains(err.Error(), "address 10.88.0.2 is already used on overlay \"fip\" by endpoint epa1 on host 192.0.2.1") {
		t.Errorf("b's endpoint with a's address: %v; want an error naming a's endpoint", err)
	}
	err = createEP(b, "f2", "epb2", "10.88.0.3/24", "")
	if err == nil || !strings.Contains(err.Error(), "outside the range 10.88.0.128/25") {
		t.Errorf("b's endpoint outside its range: %v", err)
	}
	// The host's range goes with its last network of the overlay.
	if err := b.d.DeleteEndpoint(ctx, &network.DeleteEndpointRequest{NetworkID: "f2", EndpointID: "epb1"}); err != nil {
		t.Fatal(err)
	}
	if err := b.d.DeleteNetwork(ctx, &network.DeleteNetworkRequest{NetworkID: "f2"}); err != nil {
		t.Fatal(err)
	}
	if err := b.d.CreateNetwork(ctx, foreign("f3", map[string]string{"overlay": "fip", OptIPAMRange: "10.88.0.128/26"})); err != nil {
		t.Fatalf("a new range after the host's network went: %v", err)
	}

	// In swarm the manager allocates every address, whatever the IPAM.
	sw := newSwarmHost(t, s, "192.0.2.5")
	r := foreign("swarmnet", map[string]string{"overlay": "sw"})
	r.IPv4Data[0].Pool, r.IPv4Data[0].Gateway = "10.89.0.0/24", "10.89.0.1/24"
	if err := sw.d.CreateNetwork(ctx, r); err != nil {
		t.Fatalf("swarm network of Docker's default IPAM: %v", err)
	}
	if _, err := sw.d.AllocateNetwork(ctx, allocateReq("swarm2", "10.90.0.0/24", map[string]string{OptIPAMRange: "10.90.0.0/25"})); err == nil || !strings.Contains(err.Error(), "swarm") {
		t.Errorf("swarm network with %s: %v; want it refused", OptIPAMRange, err)
	}
}

// Names, IDs, addresses and MTUs are checked before anything is stored.
func TestInputChecks(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	for _, c := range []struct {
		id, subnet string
		opts       map[string]string
		want       string
	}{
		{"n1", "10.20.0.0/24", map[string]string{"overlay": ".."}, "option overlay"},
		{"n1", "10.20.0.0/24", map[string]string{"overlay": "."}, "option overlay"},
		{"n1", "10.20.0.0/24", map[string]string{"overlay": "-x"}, "option overlay"},
		{"n1", "10.20.0.0/24", map[string]string{"overlay": "a/b"}, "option overlay"},
		{"n1", "10.20.0.0/24", map[string]string{"overlay": strings.Repeat("x", 65)}, "option overlay"},
		{"../x", "10.20.0.0/24", nil, "invalid network ID"},
		{"..", "10.20.0.0/24", nil, "invalid network ID"},
		{"a/b", "10.20.0.0/24", nil, "invalid network ID"},
		{"n1", "10.20.0.0/24", map[string]string{"mtu": "1451"}, "at most 1450"},
	} {
		if err := a.d.CreateNetwork(ctx, createReq(c.id, c.subnet, c.opts)); err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("create %q %v: %v; want an error containing %q", c.id, c.opts, err, c.want)
		}
	}
	r := createReq("n1", "10.20.0.0/24", nil)
	r.IPv4Data[0].Gateway = "10.21.0.1/24"
	if err := a.d.CreateNetwork(ctx, r); err == nil || !strings.Contains(err.Error(), "not inside subnet") {
		t.Errorf("gateway outside the subnet: %v", err)
	}
	if got := keys(t, s, overlaysDir); len(got) != 0 {
		t.Fatalf("refused networks left %v", got)
	}
	// A name of 64 characters with dots is fine; a Docker ID is.
	long := strings.Repeat("a", 62) + ".b"
	docker := strings.Repeat("0123456789abcdef", 4)
	if err := a.d.CreateNetwork(ctx, createReq(docker, "10.20.0.0/24", map[string]string{"overlay": long, "mtu": "1400"})); err != nil {
		t.Fatal(err)
	}
	// Hosts that disagree on the MTU are refused; without -o mtu the
	// overlay's is taken.
	if err := b.d.CreateNetwork(ctx, createReq("n2", "10.20.0.0/24", map[string]string{"overlay": long, "mtu": "1300"})); err == nil || !strings.Contains(err.Error(), "has MTU 1400, not 1300") {
		t.Errorf("another MTU on another host: %v", err)
	}
	if err := b.d.CreateNetwork(ctx, createReq("n2", "10.20.0.0/24", map[string]string{"overlay": long})); err != nil {
		t.Fatal(err)
	}
	n, _ := b.d.network(ctx, "n2")
	if ov := overlayOf(n); ov.MTU != 1400 {
		t.Errorf("b's network without -o mtu gets MTU %d, want the overlay's 1400", ov.MTU)
	}
	// An overlay without -o mtu runs at each host's underlay MTU: a host
	// whose underlay gives another is refused.
	if err := a.d.CreateNetwork(ctx, createReq("n3", "10.30.0.0/24", map[string]string{"overlay": "auto"})); err != nil {
		t.Fatal(err)
	}
	b.plane.mu.Lock()
	b.plane.noGRE = false
	b.plane.mu.Unlock()
	jumbo := &jumboPlane{b.plane}
	bj := New(Config{Store: s, Plane: jumbo, HostAddr: netip.MustParseAddr("192.0.2.2"), Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err := bj.CreateNetwork(ctx, createReq("n4", "10.30.0.0/24", map[string]string{"overlay": "auto"})); err == nil || !strings.Contains(err.Error(), "runs at MTU 1450 on host 192.0.2.1, but would get 8950 here") {
		t.Errorf("a host with jumbo frames on an overlay of 1450: %v", err)
	}
	if err := bj.CreateNetwork(ctx, createReq("n4", "10.30.0.0/24", map[string]string{"overlay": "auto", "mtu": "1450"})); err != nil {
		t.Errorf("the same host with -o mtu=1450: %v", err)
	}
	// Endpoint IDs.
	for _, id := range []string{"", "..", "../../x", "a/b"} {
		if err := createEP(a, docker, id, "10.20.0.5/24", ""); err == nil {
			t.Errorf("endpoint ID %q accepted", id)
		}
	}
	if _, err := a.d.network(ctx, "../"+docker); err == nil || !strings.Contains(err.Error(), "invalid network ID") {
		t.Errorf("a path-like network ID: %v", err)
	}
}

// jumboPlane is a fakePlane on an underlay of MTU 9000.
type jumboPlane struct{ *fakePlane }

func (j *jumboPlane) MaxMTU(string, bool) (int, error) { return 8950, nil }

// Endpoints recorded by the previous version have no claims: a started
// plugin claims its own, so that no new endpoint takes their MAC or
// address.
func TestClaimsOfAnEarlierVersion(t *testing.T) {
	ctx := context.Background()
	s := openStore(t)
	a, b := newHost(t, s, "192.0.2.1"), newHost(t, s, "192.0.2.2")
	for _, h := range []*testHost{a, b} {
		if err := h.d.CreateNetwork(ctx, createReq("n", "10.20.0.0/24", map[string]string{"overlay": "blue"})); err != nil {
			t.Fatal(err)
		}
	}
	a.stop()
	<-a.d.Done()
	old := endpointRecord{Network: "n", Host: "192.0.2.1", IPv4: "10.20.0.2/24", MAC: "02:00:00:00:00:01"}
	if _, err := s.Put(ctx, endpointKey("blue", "old1"), encode(old)); err != nil {
		t.Fatal(err)
	}
	newHost(t, s, "192.0.2.1")
	eventually(t, "a claims its old endpoint's MAC and address", func() bool {
		return len(keys(t, s, macsDir)) == 1 && len(keys(t, s, addrsDir)) == 1
	})
	if err := createEP(b, "n", "new1", "10.20.0.2/24", ""); err == nil || !strings.Contains(err.Error(), "by endpoint old1 on host 192.0.2.1") {
		t.Fatalf("b's endpoint with the address of a's old one: %v", err)
	}
}
