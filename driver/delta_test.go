package driver

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/store"
)

// deltaPlane is a fakePlane that also applies deltas, refusing one that
// does not fit what it holds, and counts both kinds of call.
type deltaPlane struct {
	*fakePlane
	sets, deltas atomic.Int32
	bad          atomic.Value // string: the first delta that did not fit
}

func (p *deltaPlane) SetPeers(vni uint32, peers []Peer) (int, error) {
	p.sets.Add(1)
	return p.fakePlane.SetPeers(vni, peers)
}

func (p *deltaPlane) UpdatePeers(vni uint32, d PeerDelta) (int, error) {
	p.deltas.Add(1)
	p.mu.Lock()
	defer p.mu.Unlock()
	fail := func(format string, a ...any) (int, error) {
		err := fmt.Errorf(format, a...)
		p.bad.CompareAndSwap(nil, err.Error())
		return 0, err
	}
	peers := slices.Clone(p.peers[vni])
	hosts := func() map[netip.Addr]bool {
		m := map[netip.Addr]bool{}
		for _, pe := range peers {
			m[pe.Host] = true
		}
		return m
	}
	had := hosts()
	for _, h := range d.AddHosts {
		if had[h] {
			return fail("host %s added, but it has peers already", h)
		}
	}
	for _, r := range d.Remove {
		i := slices.IndexFunc(peers, func(pe Peer) bool { return bytes.Equal(pe.MAC, r.MAC) })
		if i < 0 || !samePeer(peers[i], r) {
			return fail("remove %v: not programmed", r)
		}
		peers = slices.Delete(peers, i, i+1)
	}
	for _, a := range d.Add {
		if slices.ContainsFunc(peers, func(pe Peer) bool { return bytes.Equal(pe.MAC, a.MAC) }) {
			return fail("add %v: its MAC is programmed already", a)
		}
		if !had[a.Host] && !slices.Contains(d.AddHosts, a.Host) {
			return fail("add %v: its host was not added", a)
		}
		peers = append(peers, a)
	}
	has := hosts()
	for _, h := range d.RemoveHosts {
		if has[h] {
			return fail("host %s removed, but it still has peers", h)
		}
	}
	for h := range had {
		if !has[h] && !slices.Contains(d.RemoveHosts, h) {
			return fail("host %s has no peer left, but was not removed", h)
		}
	}
	p.peers[vni] = peers
	return len(d.Add) + len(d.Remove), nil
}

// peerSet is a plane's peers of vni, or a plan's, as sorted strings.
func peerSet(peers []Peer) []string {
	var out []string
	for _, p := range peers {
		out = append(out, fmt.Sprintf("%s %s %v", p.MAC, p.Host, p.IPs))
	}
	slices.Sort(out)
	return out
}

// deltaHost runs a driver on a deltaPlane with one local endpoint on
// overlay blue (10.20.0.0/24), and returns it with the overlay's VNI.
func deltaHost(t *testing.T, s store.Store) (*testHost, *deltaPlane, uint32) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	plane := &deltaPlane{fakePlane: newFakePlane()}
	d := New(Config{Store: s, Plane: plane, HostAddr: netip.MustParseAddr("192.0.2.1"), LiveTTL: 100 * time.Millisecond,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil))})
	d.Start(ctx)
	stop := func() { cancel(); <-d.Done() }
	t.Cleanup(stop)
	h := &testHost{d: d, plane: plane.fakePlane, stop: stop}
	if err := d.CreateNetwork(ctx, createReq("net1", "10.20.0.0/24", map[string]string{"overlay": "blue"})); err != nil {
		t.Fatal(err)
	}
	joinEP(t, h, "net1", "local0001", "10.20.0.2/24")
	n, err := d.network(ctx, "net1")
	if err != nil {
		t.Fatal(err)
	}
	return h, plane, n.Overlay.VNI
}

// remote writes what the plugins of other hosts would: their live keys
// and their endpoint records.
type remote struct {
	t *testing.T
	s store.Store
}

func (r remote) host(addr string, live bool) {
	r.t.Helper()
	var err error
	if live {
		_, err = r.s.Put(context.Background(), hostKey(addr), encode(hostRecord{Addr: addr, Name: "sim"}))
	} else {
		err = r.s.Delete(context.Background(), hostKey(addr))
	}
	if err != nil {
		r.t.Fatal(err)
	}
}

func (r remote) endpoint(id, host, ip, mac string) {
	r.t.Helper()
	rec := endpointRecord{Network: "sim", Host: host, IPv4: ip + "/24", MAC: mac}
	if _, err := r.s.Put(context.Background(), endpointKey("blue", id), encode(rec)); err != nil {
		r.t.Fatal(err)
	}
}

func (r remote) gone(id string) {
	r.t.Helper()
	if err := r.s.Delete(context.Background(), endpointKey("blue", id)); err != nil {
		r.t.Fatal(err)
	}
}

// converged waits until the plane holds what the full rules make of the
// store (DesiredState).
func converged(t *testing.T, s store.Store, plane *deltaPlane, vni uint32, when string) {
	t.Helper()
	var got, want []string
	deadline := time.Now().Add(10 * time.Second)
	for {
		plan, err := DesiredState(context.Background(), s, netip.MustParseAddr("192.0.2.1"))
		if err == nil {
			want = nil
			for _, ov := range plan.Overlays {
				if ov.VNI == vni {
					want = peerSet(ov.Peers)
				}
			}
			plane.mu.Lock()
			got = peerSet(plane.peers[vni])
			plane.mu.Unlock()
			if slices.Equal(got, want) {
				return
			}
		}
		if bad := plane.bad.Load(); bad != nil {
			t.Fatalf("%s: a delta did not fit what the plane held: %s", when, bad)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: the plane holds\n  %s\nthe full rules want\n  %s\n(plan error %v)", when,
				strings.Join(got, "\n  "), strings.Join(want, "\n  "), err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Plain changes of other hosts' endpoints are applied as deltas: no full
// reconciliation (SetPeers) while endpoints come and go.
func TestDeltasApplyPlainChanges(t *testing.T) {
	s := openStore(t)
	h, plane, vni := deltaHost(t, s)
	r := remote{t, s}
	r.host("192.0.2.10", true)
	r.host("192.0.2.11", true)
	for i := range 20 {
		r.endpoint(fmt.Sprintf("sim%04d", i), fmt.Sprintf("192.0.2.%d", 10+i%2), fmt.Sprintf("10.20.0.%d", 10+i), fmt.Sprintf("02:00:00:00:00:%02x", i+1))
	}
	converged(t, s, plane, vni, "20 remote endpoints")
	time.Sleep(300 * time.Millisecond) // let the passes after the first settle
	sets, deltas := plane.sets.Load(), plane.deltas.Load()

	r.endpoint("sim0100", "192.0.2.10", "10.20.0.100", "02:00:00:00:01:00") // added
	r.gone("sim0003")                                                       // removed
	r.endpoint("sim0004", "192.0.2.10", "10.20.0.104", "02:00:00:00:00:05") // moved to another host and address
	converged(t, s, plane, vni, "after plain changes")
	if got := plane.sets.Load(); got != sets {
		t.Errorf("plain changes ran %d full reconciliations; want deltas only", got-sets)
	}
	if plane.deltas.Load() == deltas {
		t.Errorf("plain changes were applied without a delta")
	}
	// A remote host's last endpoint goes, a new host's first comes.
	sets = plane.sets.Load()
	r.host("192.0.2.12", true) // a new live host: one full pass
	eventually(t, "a full pass after a new host", func() bool { return plane.sets.Load() > sets })
	sets = plane.sets.Load()
	for i := 0; i < 20; i += 2 {
		if i != 4 {
			r.gone(fmt.Sprintf("sim%04d", i))
		}
	}
	r.gone("sim0004")
	r.gone("sim0100")
	r.endpoint("sim0200", "192.0.2.12", "10.20.0.200", "02:00:00:00:02:00")
	converged(t, s, plane, vni, "after host 10's last endpoint went and host 12's first came")
	if got := plane.sets.Load(); got != sets {
		t.Errorf("endpoints coming and going ran %d full reconciliations; want deltas only", got-sets)
	}

	// Containers of this host come and go on the overlay it has: no full
	// reconciliation either, until its last one goes (the overlay goes).
	joinEP(t, h, "net1", "local0002", "10.20.0.202/24")
	joinEP(t, h, "net1", "local0003", "10.20.0.203/24")
	leaveEP(t, h, "net1", "local0002")
	r.endpoint("sim0300", "192.0.2.12", "10.20.0.150", "02:00:00:00:03:00")
	converged(t, s, plane, vni, "after local containers came and went")
	if got := plane.sets.Load(); got != sets {
		t.Errorf("local containers coming and going on an overlay this host has ran %d full reconciliations; want none", got-sets)
	}
	leaveEP(t, h, "net1", "local0001")
	leaveEP(t, h, "net1", "local0003")
	eventually(t, "the overlay goes with this host's last container", func() bool { return len(plane.vnis()) == 0 })
}

// localStep is the step a local endpoint of TestDeltasMatchTheFullRules
// joined at.
func localStep(id string) int {
	var n int
	fmt.Sscanf(id, "local%d", &n)
	return n
}

// Whatever the store goes through (conflicting MACs and addresses, bad
// records, hosts lost and back), the deltas and the full passes together
// leave the plane with what the full rules make of the store.
func TestDeltasMatchTheFullRules(t *testing.T) {
	s := openStore(t)
	h, plane, vni := deltaHost(t, s)
	r := remote{t, s}
	hosts := []string{"192.0.2.10", "192.0.2.11", "192.0.2.12", "192.0.2.13"}
	for _, h := range hosts {
		r.host(h, true)
	}
	rnd := rand.New(rand.NewPCG(1, 2))
	ids := 40
	locals := []string{"local0001"}
	for step := range 400 {
		id := fmt.Sprintf("sim%04d", rnd.IntN(ids))
		host := hosts[rnd.IntN(len(hosts))]
		// Pools small enough that MACs and addresses collide now and then.
		mac := fmt.Sprintf("02:00:00:00:00:%02x", 1+rnd.IntN(60))
		ip := fmt.Sprintf("10.20.0.%d", 10+rnd.IntN(60))
		switch x := rnd.IntN(100); {
		case x < 50:
			r.endpoint(id, host, ip, mac)
		case x < 78:
			r.gone(id)
		case x < 83:
			r.endpoint(id, host, ip, "ff:ff:ff:ff:ff:ff") // not a unicast MAC
		case x < 88:
			r.host(host, false)
		case x < 92:
			r.host(host, true)
		case x < 96: // a container of this host starts
			lid := fmt.Sprintf("local%04d", step)
			joinEP(t, h, "net1", lid, fmt.Sprintf("10.20.0.%d/24", 100+step%100)) // no two alive at once
			locals = append(locals, lid)
		default: // one stops (and so none lives 100 steps)
			if len(locals) > 0 {
				i := rnd.IntN(len(locals))
				leaveEP(t, h, "net1", locals[i])
				locals = slices.Delete(locals, i, i+1)
			}
		}
		if len(locals) > 0 && locals[0] != "local0001" && step-localStep(locals[0]) >= 90 {
			leaveEP(t, h, "net1", locals[0])
			locals = locals[1:]
		}
		if step%25 == 24 {
			converged(t, s, plane, vni, fmt.Sprintf("step %d", step))
		}
	}
	for _, h := range hosts {
		r.host(h, true)
	}
	converged(t, s, plane, vni, "the end")
	if plane.deltas.Load() == 0 {
		t.Errorf("no change was applied as a delta")
	}
	t.Logf("full reconciliations %d, deltas %d", plane.sets.Load(), plane.deltas.Load())
}
