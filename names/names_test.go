package names

import (
	"io"
	"log/slog"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/docker/go-plugins-helpers/network"
	"github.com/miekg/dns"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/store"
)

var (
	h1, h2, h3 = "192.0.2.1", "192.0.2.2", "192.0.2.3"
	a          = netip.MustParseAddr
)

func ep(overlay, id, host, v4, v6 string) driver.KnownEndpoint {
	e := driver.KnownEndpoint{Overlay: overlay, ID: id, Host: host, IPv4: a(v4)}
	if v6 != "" {
		e.IPv6 = a(v6)
	}
	return e
}

// testIndex: overlay blue with web (h1, dual stack) and two "worker"
// replicas (h1, h2), overlay red with db (h2); a client container on h3 on
// blue, and one on h3 on both blue and red.
func testIndex() *index {
	eps := []driver.KnownEndpoint{
		ep("blue", "e-web", h1, "10.1.0.2", "fd00::2"),
		ep("blue", "e-w1", h1, "10.1.0.3", ""),
		ep("blue", "e-w2", h2, "10.1.0.4", ""),
		ep("red", "e-db", h2, "10.2.0.2", ""),
		ep("blue", "e-client", h3, "10.1.0.9", ""),
		ep("blue", "e-both-b", h3, "10.1.0.10", ""),
		ep("red", "e-both-r", h3, "10.2.0.10", ""),
		ep("blue", "e-dead", "192.0.2.99", "10.1.0.99", ""),
	}
	recs := map[string]record{
		recordKey("blue", "e-web"):  {Host: h1, Name: "p1-web-1", Network: "p1_blue", Names: []string{"p1-web-1", "web"}},
		recordKey("blue", "e-w1"):   {Host: h1, Name: "p1-worker-1", Network: "p1_blue", Names: []string{"p1-worker-1", "worker"}},
		recordKey("blue", "e-w2"):   {Host: h2, Name: "p2-worker-1", Network: "p2_blue", Names: []string{"p2-worker-1", "worker"}},
		recordKey("red", "e-db"):    {Host: h2, Name: "db", Network: "red", Names: []string{"db"}},
		recordKey("blue", "e-dead"): {Host: "192.0.2.99", Name: "ghost", Network: "blue", Names: []string{"ghost"}},
	}
	return buildIndex(indexInput{
		host:      h3,
		endpoints: eps,
		live:      map[string]bool{h1: true, h2: true, h3: true},
		records:   recs,
		sandboxes: map[string]string{"e-client": "sb1", "e-both-b": "sb2", "e-both-r": "sb2"},
	})
}

func query(name string, qtype uint16) *dns.Msg {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	return m
}

func answers(m *dns.Msg) []string {
	var out []string
	for _, rr := range m.Answer {
		switch r := rr.(type) {
		case *dns.A:
			out = append(out, r.A.String())
		case *dns.AAAA:
			out = append(out, r.AAAA.String())
		case *dns.PTR:
			out = append(out, r.Ptr)
		}
	}
	return out
}

func TestAnswer(t *testing.T) {
	ix := testIndex()
	client, both := a("10.1.0.9"), a("10.1.0.10")
	cases := []struct {
		what    string
		overlay string
		src     netip.Addr
		name    string
		qtype   uint16
		rcode   int
		want    []string
	}{
		{"service name", "blue", client, "web", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.2"}},
		{"container name, any case", "blue", client, "P1-Web-1.", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.2"}},
		{"AAAA", "blue", client, "web", dns.TypeAAAA, dns.RcodeSuccess, []string{"fd00::2"}},
		{"AAAA of an IPv4-only name: empty, not forwarded", "blue", client, "worker", dns.TypeAAAA, dns.RcodeSuccess, nil},
		{"other types of a known name: empty", "blue", client, "web", dns.TypeMX, dns.RcodeSuccess, nil},
		{"an alias on two hosts: both", "blue", client, "worker", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.3", "10.1.0.4"}},
		{"another overlay's name: not ours", "blue", client, "db", dns.TypeA, dns.RcodeRefused, nil},
		{"the outside world: not ours", "blue", client, "example.com", dns.TypeA, dns.RcodeRefused, nil},
		{"a lost host's name: gone", "blue", client, "ghost", dns.TypeA, dns.RcodeRefused, nil},
		{"a container on two overlays sees both (blue)", "blue", both, "web", dns.TypeA, dns.RcodeSuccess, []string{"10.1.0.2"}},
		{"a container on two overlays sees both (red)", "blue", both, "db", dns.TypeA, dns.RcodeSuccess, []string{"10.2.0.2"}},
		{"an unknown source sees the overlay only", "red", a("10.2.0.77"), "web", dns.TypeA, dns.RcodeRefused, nil},
		{"PTR", "blue", client, "2.0.1.10.in-addr.arpa", dns.TypePTR, dns.RcodeSuccess, []string{"p1-web-1.p1_blue."}},
		{"PTR IPv6", "blue", client, "2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa", dns.TypePTR, dns.RcodeSuccess, []string{"p1-web-1.p1_blue."}},
		{"PTR of another overlay's address", "blue", client, "2.0.2.10.in-addr.arpa", dns.TypePTR, dns.RcodeRefused, nil},
		{"PTR of an unknown address", "blue", client, "8.8.8.8.in-addr.arpa", dns.TypePTR, dns.RcodeRefused, nil},
	}
	for _, c := range cases {
		q := query(c.name, c.qtype)
		resp := answer(ix, c.overlay, c.src, q)
		if resp.Rcode != c.rcode || !slices.Equal(answers(resp), c.want) {
			t.Errorf("%s: %s %s from %s on %s: rcode %s answers %v, want %s %v", c.what, c.name, dns.TypeToString[c.qtype], c.src, c.overlay,
				dns.RcodeToString[resp.Rcode], answers(resp), dns.RcodeToString[c.rcode], c.want)
		}
		if resp.Rcode == dns.RcodeSuccess && (!resp.Authoritative || resp.Id != q.Id || !resp.Response) {
			t.Errorf("%s: reply not authoritative or not a response: %v", c.what, resp)
		}
	}
}

// TestScopeWithoutOwnLiveKey: a host that does not see its own live key
// (not registered yet, say) still scopes its containers' queries by
// their containers.
func TestScopeWithoutOwnLiveKey(t *testing.T) {
	ix := buildIndex(indexInput{
		host: h3,
		endpoints: []driver.KnownEndpoint{
			ep("red", "e-db", h2, "10.2.0.2", ""),
			ep("blue", "e-both-b", h3, "10.1.0.10", ""),
			ep("red", "e-both-r", h3, "10.2.0.10", ""),
		},
		live:      map[string]bool{h2: true},
		records:   map[string]record{recordKey("red", "e-db"): {Host: h2, Name: "db", Network: "red", Names: []string{"db"}}},
		sandboxes: map[string]string{"e-both-b": "sb", "e-both-r": "sb"},
	})
	if got := answers(answer(ix, "blue", a("10.1.0.10"), query("db", dns.TypeA))); !slices.Equal(got, []string{"10.2.0.2"}) {
		t.Errorf("db from a container on blue and red = %v, want 10.2.0.2", got)
	}
}

func TestReverseAddr(t *testing.T) {
	for _, c := range []struct {
		in   string
		want string
	}{
		{"4.3.2.1.in-addr.arpa.", "1.2.3.4"},
		{"4.3.2.1.IN-ADDR.ARPA", "1.2.3.4"},
		{"b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.0.0.0.0.1.2.3.4.ip6.arpa.", "4321:0:1:2:3:4:567:89ab"},
		{"3.2.1.in-addr.arpa.", ""},
		{"x.3.2.1.in-addr.arpa.", ""},
		{"1.0.ip6.arpa.", ""},
		{"example.com.", ""},
	} {
		got, ok := reverseAddr(c.in)
		if (c.want == "") == ok || (ok && got.String() != c.want) {
			t.Errorf("reverseAddr(%q) = %v %v, want %q", c.in, got, ok, c.want)
		}
	}
}

func TestPickRoute(t *testing.T) {
	for _, c := range []struct {
		used []int
		want int
	}{
		{nil, 32},
		{[]int{32}, 31},
		{[]int{31}, 32},
		{[]int{32, 31, 30}, 29},
		{[]int{32, 31, 30, 29, 28, 27, 26, 25, 24}, 0},
	} {
		if got := pickRoute(c.used); got != c.want {
			t.Errorf("pickRoute(%v) = %d, want %d", c.used, got, c.want)
		}
	}
	if r := staticRoute(DefaultAddr, 30); r.Destination != "169.254.53.52/30" || r.RouteType != 1 {
		t.Errorf("staticRoute /30 = %+v", r)
	}
}

func TestSplitKey(t *testing.T) {
	if o, id, ok := splitKey(recordKey("blue", "abc")); !ok || o != "blue" || id != "abc" {
		t.Errorf("splitKey(recordKey) = %q %q %v", o, id, ok)
	}
	for _, bad := range []string{"names/blue", "names//x", "endpoints/blue/x", "names/blue/x/y"} {
		if _, _, ok := splitKey(bad); ok {
			t.Errorf("splitKey(%q) accepted", bad)
		}
	}
}

func testService(t *testing.T, host string) *Service {
	t.Helper()
	s, err := New(Config{Store: nopStore{}, Host: host, Addr: DefaultAddr, NetNS: func(uint32) (string, error) { return "", nil },
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// nopStore: sync is not exercised here (planLocked is).
type nopStore struct{ store.Store }

func TestNewChecksAddr(t *testing.T) {
	for _, bad := range []string{"10.0.0.53", "fe80::53", "127.0.0.53"} {
		if _, err := New(Config{Store: nopStore{}, Host: h1, Addr: a(bad), NetNS: func(uint32) (string, error) { return "", nil }}); err == nil {
			t.Errorf("New accepted name server address %s", bad)
		}
	}
}

func TestJoinRoutes(t *testing.T) {
	s := testService(t, h1)
	blue, red, green := driver.Overlay{Name: "blue"}, driver.Overlay{Name: "red"}, driver.Overlay{Name: "green"}
	dest := func(rs []*network.StaticRoute) string {
		if len(rs) != 1 {
			return ""
		}
		return rs[0].Destination
	}
	if d := dest(s.Join(blue, "e1", "sb1")); d != "169.254.53.53/32" {
		t.Errorf("first endpoint of a container: route %q, want the /32", d)
	}
	if d := dest(s.Join(red, "e2", "sb1")); d != "169.254.53.52/31" {
		t.Errorf("second endpoint of the container: route %q, want a /31 (no clash)", d)
	}
	if d := dest(s.Join(blue, "e3", "sb2")); d != "169.254.53.53/32" {
		t.Errorf("another container: route %q, want the /32", d)
	}
	if d := dest(s.Join(red, "e2", "sb1")); d != "169.254.53.52/31" {
		t.Errorf("Join again: route %q, want the same /31", d)
	}
	// The /32 endpoint leaves; a new one must not take the /31.
	s.Leave("e1")
	if d := dest(s.Join(green, "e4", "sb1")); d != "169.254.53.53/32" {
		t.Errorf("after the /32 left: route %q, want the /32 again", d)
	}
	// After a restart, the records remember the routes given before.
	r := testService(t, h1)
	r.records[recordKey("red", "e2")] = record{Host: h1, Sandbox: "sb1", Route: 31}
	r.records[recordKey("green", "e4")] = record{Host: h1, Sandbox: "sb1", Route: 32}
	if d := dest(r.Join(blue, "e5", "sb1")); d != "169.254.53.52/30" {
		t.Errorf("after a restart: route %q, want a /30", d)
	}
}

func TestPlan(t *testing.T) {
	s := testService(t, h2)
	s.haveView, s.haveRecords = true, true
	s.live = map[string]bool{h1: true, h2: true} // h3 is lost
	s.endpoints = []driver.KnownEndpoint{
		ep("blue", "mine-new", h2, "10.1.0.5", ""),
		ep("blue", "mine-same", h2, "10.1.0.6", ""),
		ep("blue", "mine-unnamed", h2, "10.1.0.7", ""),
		ep("blue", "lost-not-orphaned", h3, "10.1.0.8", ""),
	}
	s.docker = map[string]dockerEndpoint{
		"mine-new":  {Container: "c1", Name: "a", Network: "blue", Names: []string{"a"}, Sandbox: "sb-a"},
		"mine-same": {Container: "c2", Name: "b", Network: "blue", Names: []string{"b", "x"}, Sandbox: "sb-b"},
	}
	s.joins = map[string]joined{"mine-new": {sandbox: "sb-a", overlay: "blue", route: 32}}
	s.records = map[string]record{
		recordKey("blue", "mine-same"):         {Host: h2, Container: "c2", Name: "b", Network: "blue", Names: []string{"b", "x"}, Sandbox: "sb-b", Route: 31},
		recordKey("blue", "mine-gone"):         {Host: h2, Name: "gone"},
		recordKey("blue", "lost-not-orphaned"): {Host: h3, Name: "l"},
		recordKey("blue", "lost-orphaned"):     {Host: h3, Name: "o"},
		recordKey("blue", "other-live-gone"):   {Host: h1, Name: "z"},
		recordKey("blue", "other-live-h3"):     {Host: h3, Name: "y"},
	}
	puts, dels := s.planLocked()
	want := record{Host: h2, Container: "c1", Name: "a", Network: "blue", Names: []string{"a"}, Sandbox: "sb-a", Route: 32}
	if len(puts) != 1 || !puts[recordKey("blue", "mine-new")].equal(want) {
		t.Errorf("puts = %+v, want only mine-new %+v (mine-same is unchanged and keeps its route after a restart)", puts, want)
	}
	// h2 is not the collector (h1 is live and lower): only its own.
	if !slices.Equal(dels, []string{recordKey("blue", "mine-gone")}) {
		t.Errorf("deletes = %v, want only this host's record without endpoint", dels)
	}
	// Now h1 is lost and h3 is back: h2 is the live host with the lowest
	// address and also deletes the lost host's record without endpoint,
	// but not those of live hosts (their own job).
	s.live = map[string]bool{h2: true, h3: true}
	_, dels = s.planLocked()
	if !slices.Equal(dels, []string{recordKey("blue", "mine-gone"), recordKey("blue", "other-live-gone")}) {
		t.Errorf("collector's deletes = %v, want also the lost host's record whose endpoint is gone", dels)
	}
}

func TestNameSet(t *testing.T) {
	got := nameSet([]string{"/Web", ""}, []string{"web", "p1-web-1", "abc123."})
	if !slices.Equal(got, []string{"abc123", "p1-web-1", "web"}) {
		t.Errorf("nameSet = %v", got)
	}
}

// TestCache: what one run knew answers names in the next, before the
// store does.
func TestCache(t *testing.T) {
	file := filepath.Join(t.TempDir(), "names.json")
	s := testService(t, h1)
	s.cfg.Cache = file
	s.haveView, s.haveRecords = true, true
	s.endpoints = []driver.KnownEndpoint{ep("blue", "e-web", h2, "10.1.0.2", ""), ep("blue", "e-me", h1, "10.1.0.3", "")}
	s.live = map[string]bool{h1: true, h2: true}
	s.records = map[string]record{recordKey("blue", "e-web"): {Host: h2, Name: "web", Network: "blue", Names: []string{"web"}}}
	if err := s.saveCache(); err != nil {
		t.Fatal(err)
	}
	r := testService(t, h1)
	r.cfg.Cache = file
	if got, _ := r.idx.Load().lookup([]string{"blue"}, "web"); len(got) != 0 {
		t.Fatalf("a new service knows web before loading the cache: %v", got)
	}
	r.loadCache()
	resp := answer(r.idx.Load(), "blue", a("10.1.0.3"), query("web", dns.TypeA))
	if got := answers(resp); !slices.Equal(got, []string{"10.1.0.2"}) {
		t.Errorf("after loading the cache: web = %v (%s), want 10.1.0.2", got, dns.RcodeToString[resp.Rcode])
	}
	// Nothing from the store yet: it neither publishes nor rewrites the cache.
	if r.haveView || r.haveRecords {
		t.Errorf("the cache counts as the store's view")
	}
}
