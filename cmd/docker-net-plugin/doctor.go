package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/store"
)

// errProblems is doctor's answer when the kernel and the store disagree.
var errProblems = errors.New("problems found")

// doctor compares this host's kernel with what the store says it should
// hold, prints every difference with what to do about it, and with --fix
// repairs what it can.
func doctor(ctx context.Context, w io.Writer, args []string) error {
	var sc store.Config
	var hf hostFlags
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	addStoreFlags(fs, &sc)
	addHostFlags(fs, &hf)
	if err := envFlags(fs); err != nil { // the plugin's own settings, not the ones below
		return err
	}
	fix := fs.Bool("fix", false, "repair what differs: run the plugin's reconciliation and remove stray namespaces and devices")
	timeout := fs.Duration("timeout", time.Minute, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("doctor takes no arguments, got %q", fs.Args())
	}
	addr, err := advertiseAddr(hf.advertise)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	st, err := openStore(ctx, sc)
	if err != nil {
		return err
	}
	defer st.Close()

	d := &doctorRun{
		w: w, st: st, addr: addr,
		host: &overlay.Host{Dir: hf.netnsDir, Prefix: hf.netnsPrefix},
		dir:  hf.netnsDir, prefix: hf.netnsPrefix, enc: hf.encryption,
	}
	fmt.Fprintf(w, "checking host %s against %s (overlay namespaces %s)\n", addr, st.Endpoint(),
		filepath.Join(d.dir, d.prefix+"<vni>"))
	if err := d.check(ctx); err != nil {
		return err
	}
	for round := 0; *fix && len(d.problems) > 0 && round < 2; round++ {
		if !d.fixable() {
			break
		}
		fmt.Fprintln(w, "\nfixing:")
		if err := d.repair(ctx); err != nil {
			return err
		}
		fmt.Fprintln(w, "\nchecking again:")
		if err := d.check(ctx); err != nil {
			return err
		}
	}
	if n := len(d.problems); n > 0 {
		fmt.Fprintf(w, "\n%d problem(s) found\n", n)
		if !*fix && d.fixable() {
			fmt.Fprintln(w, `run "docker-net-plugin doctor --fix" with the same flags to repair what it can`)
		}
		return fmt.Errorf("%w: %d", errProblems, n)
	}
	fmt.Fprintln(w, "\nno problems found")
	return nil
}

// problem is one difference between the kernel and the store.
type problem struct {
	what, fix string
	// reconcile: the plugin's reconciliation repairs it.
	reconcile bool
	// remove, if set, is how --fix deletes something stray.
	remove func() error
}

type doctorRun struct {
	w           io.Writer
	st          store.Store
	addr        netip.Addr
	host        *overlay.Host
	dir, prefix string
	enc         encryptionFlags

	problems []problem
	// orphans are this host's orphaned endpoints, by id: their interfaces
	// are not stray.
	orphans map[string]driver.OrphanedEndpoint
}

func (d *doctorRun) ok(format string, args ...any) {
	fmt.Fprintf(d.w, "ok       "+format+"\n", args...)
}

func (d *doctorRun) note(format string, args ...any) {
	fmt.Fprintf(d.w, "note     "+format+"\n", args...)
}

func (d *doctorRun) problem(p problem) {
	d.problems = append(d.problems, p)
	fmt.Fprintf(d.w, "PROBLEM  %s\n         fix: %s\n", p.what, p.fix)
}

func (d *doctorRun) fixable() bool {
	return slices.ContainsFunc(d.problems, func(p problem) bool { return p.reconcile || p.remove != nil })
}

const fixReconcile = `"docker-net-plugin doctor --fix" (or restarting the plugin) programs it again`

// repair removes what is stray, then runs the plugin's reconciliation. It
// holds the host's overlay lock exclusively meanwhile, and first checks
// again under it: the running plugin builds overlays and endpoints only
// while it holds that lock (shared), so nothing found stray now can be
// something a Join is building or a container uses (its endpoint record
// is written before its Join builds anything).
func (d *doctorRun) repair(ctx context.Context) error {
	unlock, err := d.host.LockExclusive(ctx)
	if err != nil {
		return fmt.Errorf("wait for the plugin's operations in flight: %w", err)
	}
	defer unlock()
	w := d.w
	d.w = io.Discard
	err = d.check(ctx)
	d.w = w
	if err != nil {
		return err
	}
	for _, p := range d.problems {
		if p.remove == nil {
			continue
		}
		if err := p.remove(); err != nil {
			fmt.Fprintf(d.w, "failed   %s: %v\n", p.what, err)
		} else {
			fmt.Fprintf(d.w, "removed  %s\n", p.what)
		}
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	plane := driver.NewKernelPlane(d.addr, d.dir, d.prefix)
	if enc, _, err := d.enc.encryption("warn"); err == nil {
		plane = driver.NewEncryptingKernelPlane(d.addr, d.dir, d.prefix, enc)
	}
	changes, err := driver.Reconcile(ctx, d.st, plane, d.addr, log)
	if err != nil {
		fmt.Fprintf(d.w, "failed   reconciliation (%d kernel changes made): %v\n", changes, err)
		return nil
	}
	fmt.Fprintf(d.w, "done     reconciliation with the store: %d kernel change(s)\n", changes)
	return nil
}

// check compares the kernel with the store and records the problems.
func (d *doctorRun) check(ctx context.Context) error {
	d.problems = nil
	plan, err := driver.DesiredState(ctx, d.st, d.addr)
	if plan == nil {
		return err
	}
	if err != nil {
		d.problem(problem{
			what: fmt.Sprintf("part of this host's state cannot be read from the store: %v", err),
			fix:  "check the store and the records named; what could be read is checked below",
		})
	}
	for _, sk := range plan.Skipped {
		fix := fmt.Sprintf("remove the container of endpoint %s on host %s (docker rm -f), or, if it has none, delete the record endpoints/%s/%s from the store",
			short(sk.Endpoint), sk.Host, sk.Overlay, sk.Endpoint)
		d.problem(problem{
			what: fmt.Sprintf("overlay %s: endpoint record %s (host %s, %s, MAC %s) is skipped by every host: %s",
				sk.Overlay, short(sk.Endpoint), sk.Host, sk.IPv4, sk.MAC, sk.Reason),
			fix: fix,
		})
	}
	if slices.Contains(plan.LiveHosts, d.addr.String()) {
		d.ok("plugin of %s is registered in the store (alive); %d live host(s) in all", d.addr, len(plan.LiveHosts))
	} else {
		d.problem(problem{
			what: fmt.Sprintf("no live plugin is registered for %s: the other hosts ignore this host's endpoints", d.addr),
			fix:  "start the plugin, check that it reaches the store, and that doctor's --advertise-addr is the plugin's",
		})
	}
	overhead := 50 // outer IPv4, UDP and VXLAN headers and the inner Ethernet header
	if d.addr.Is6() {
		overhead = 70
	}
	underMTU, underDev := underlayMTU(d.addr)
	if underMTU == 0 {
		d.problem(problem{
			what: fmt.Sprintf("advertise address %s is on no device of this network namespace", d.addr),
			fix:  "run doctor on the host (or in the namespace) the plugin runs in, with the plugin's --advertise-addr",
		})
	} else {
		d.ok("underlay device %s has MTU %d: overlays without -o mtu get %d", underDev, underMTU, underMTU-overhead)
	}

	wanted := map[string]bool{}
	vnis := map[uint32]string{}
	for _, po := range plan.Overlays {
		wanted[strconv.FormatUint(uint64(po.VNI), 10)] = true
		vnis[po.VNI] = po.Name
	}
	d.checkHostVXLAN(vnis)
	kept := d.checkOrphans(plan.Orphans)

	ids, err := d.host.ListNetworks()
	if err != nil {
		return fmt.Errorf("list overlay namespaces: %w", err)
	}
	for _, id := range ids {
		if wanted[id] {
			continue
		}
		if kept[id] {
			d.note("overlay namespace %s stays for this host's orphaned endpoint(s)", filepath.Join(d.dir, d.prefix+id))
			continue
		}
		d.problem(problem{
			what: fmt.Sprintf("stray overlay namespace %s: no overlay with an endpoint on this host uses it",
				filepath.Join(d.dir, d.prefix+id)),
			fix:    "doctor --fix deletes it with every device in it",
			remove: func() error { return d.host.DeleteNetwork(id) },
		})
	}

	for _, po := range plan.Overlays {
		mtu := po.MTU
		if mtu == 0 && underMTU > 0 {
			mtu = underMTU - overhead
			if po.Encrypted {
				mtu -= overlay.EncryptionOverhead
			}
		}
		d.checkOverlay(po, mtu)
	}
	if len(plan.Overlays) == 0 {
		d.ok("no overlay has an endpoint on this host: no overlay namespace expected")
	}
	d.note("iptables: nothing to compare: the plugin installs no rules (egress and published ports go through docker_gwbridge, which Docker programs; overlays are isolated by living in separate namespaces)")
	return nil
}

// checkOrphans reports this host's orphaned endpoints (their records were
// set aside while the host was lost) and returns the ids of the overlay
// namespaces they keep.
func (d *doctorRun) checkOrphans(orphans []driver.OrphanedEndpoint) map[string]bool {
	d.orphans = map[string]driver.OrphanedEndpoint{}
	kept := map[string]bool{}
	for _, o := range orphans {
		d.orphans[o.ID] = o
		if o.VNI != 0 {
			kept[strconv.FormatUint(uint64(o.VNI), 10)] = true
		}
		if o.Conflict != "" {
			d.problem(problem{
				what: fmt.Sprintf("endpoint %s (%s) on overlay %s gave up its address and is cut off: %s", short(o.ID), o.IPv4, o.Overlay, o.Conflict),
				fix:  "remove and re-create its container (docker rm -f, docker run): it gets a new address",
			})
			continue
		}
		d.note("endpoint %s (%s) on overlay %s is orphaned (set aside while this host was lost); the plugin restores it once this host is registered again", short(o.ID), o.IPv4, o.Overlay)
	}
	return kept
}

// checkHostVXLAN finds VXLAN devices of this namespace that hold the UDP
// port and VNI an overlay needs (another tool's, or Docker's own overlay).
func (d *doctorRun) checkHostVXLAN(vnis map[uint32]string) {
	links, err := netlink.LinkList()
	if err != nil {
		d.problem(problem{what: fmt.Sprintf("cannot list this namespace's devices: %v", err), fix: "run doctor as root"})
		return
	}
	for _, l := range links {
		vx, ok := l.(*netlink.Vxlan)
		if !ok || vx.Port != overlay.VXLANPort {
			continue
		}
		if name, ok := vnis[uint32(vx.VxlanId)]; ok {
			d.problem(problem{
				what: fmt.Sprintf("host device %s is a VXLAN device with VNI %d on port %d, which overlay %s needs", vx.Name, vx.VxlanId, vx.Port, name),
				fix:  fmt.Sprintf("it is not the plugin's: delete it (ip link del %s) or give the overlay another VNI (-o vni=)", vx.Name),
			})
		}
	}
}

// checkOverlay compares one overlay's namespace with the plan.
func (d *doctorRun) checkOverlay(po driver.PlannedOverlay, mtu int) {
	id := strconv.FormatUint(uint64(po.VNI), 10)
	path := filepath.Join(d.dir, d.prefix+id)
	label := fmt.Sprintf("overlay %s (vni %d)", po.Name, po.VNI)
	before := len(d.problems)

	n, nerr := d.host.Network(id)
	if errors.Is(nerr, overlay.ErrNotFound) {
		d.problem(problem{
			what:      fmt.Sprintf("%s: namespace %s is missing although %d endpoint(s) of this host are on it", label, path, len(po.Endpoints)),
			fix:       fixReconcile + "; then restart the containers on it, whose interfaces went with the namespace",
			reconcile: true,
		})
		return
	}
	vxlan := po.Encap == "" || po.Encap == overlay.EncapVXLAN
	devicesOK := d.checkDevices(po, label, path, mtu, vxlan)
	if !vxlan {
		d.note("%s: encap %s: doctor checks its namespace, bridge and endpoint ports only, not its tunnels or forwarding entries", label, po.Encap)
		return
	}
	if nerr != nil {
		if devicesOK {
			d.problem(problem{what: fmt.Sprintf("%s: %v", label, nerr), fix: fixReconcile, reconcile: true})
		}
		return
	}
	st, err := n.State()
	if err != nil {
		d.problem(problem{what: fmt.Sprintf("%s: read its state: %v", label, err), fix: fixReconcile, reconcile: true})
		return
	}
	fdb, neigh := d.checkPeers(po, label, st)
	if len(d.problems) == before {
		hosts := map[netip.Addr]bool{}
		for _, p := range po.Peers {
			hosts[p.Host] = true
		}
		d.ok("%s: namespace, br0, vxlan0 and %d endpoint port(s) as expected (MTU %d); %d forwarding and %d neighbour entries for %d peer(s) on %d other host(s)",
			label, len(po.Endpoints), mtu, fdb, neigh, len(po.Peers), len(hosts))
	}
}

// checkDevices checks the devices in the overlay namespace; it reports
// whether br0 and vxlan0 are right. For another encapsulation than VXLAN
// it checks only the bridge and the endpoint ports, and calls nothing
// stray (the tunnel devices are not its business).
func (d *doctorRun) checkDevices(po driver.PlannedOverlay, label, path string, mtu int, vxlan bool) bool {
	h, closeNS, err := openNS(path)
	if err != nil {
		d.problem(problem{what: fmt.Sprintf("%s: %v", label, err), fix: fixReconcile, reconcile: true})
		return false
	}
	defer closeNS()
	links, err := h.LinkList()
	if err != nil {
		d.problem(problem{what: fmt.Sprintf("%s: list devices: %v", label, err), fix: "run doctor as root"})
		return false
	}
	var br, vx netlink.Link
	for _, l := range links {
		switch l.Attrs().Name {
		case "br0":
			br = l
		case "vxlan0":
			vx = l
		}
	}
	bad := func(what string) {
		d.problem(problem{what: label + ": " + what, fix: fixReconcile, reconcile: true})
	}
	okBefore := len(d.problems)
	if br == nil {
		bad("bridge br0 is missing")
	} else if br.Type() != "bridge" {
		bad(fmt.Sprintf("br0 is a %s device, not a bridge", br.Type()))
	} else {
		checkLink(br, mtu, nil, bad)
		d.checkGateways(h, br, po, bad)
	}
	if vxlan {
		d.checkVXLAN(vx, br, po.VNI, mtu, bad)
	}
	devicesOK := len(d.problems) == okBefore

	local := map[string]bool{}
	for _, ep := range po.Endpoints {
		local[ep.ID] = true
	}
	ports := map[string]bool{}
	for _, l := range links {
		a := l.Attrs()
		if a.Name == "lo" || l == br || l == vx {
			continue
		}
		if _, ok := d.orphans[a.Alias]; ok && l.Type() == "veth" {
			continue // an orphaned endpoint's: checkOrphans reported it
		}
		if l.Type() == "veth" && local[a.Alias] {
			ports[a.Alias] = true
			checkLink(l, mtu, br, func(what string) {
				d.problem(problem{
					what: fmt.Sprintf("%s: endpoint %s: %s", label, short(a.Alias), what),
					fix:  "restart the container of that endpoint",
				})
			})
			continue
		}
		if !vxlan {
			continue
		}
		why := "the plugin did not make it"
		if a.Alias != "" && l.Type() == "veth" {
			why = fmt.Sprintf("it was endpoint %s, which this host no longer has", short(a.Alias))
		}
		name := a.Name
		d.problem(problem{
			what:   fmt.Sprintf("%s: stray %s device %s in namespace %s: %s", label, l.Type(), name, path, why),
			fix:    "doctor --fix deletes it",
			remove: func() error { return deleteLink(path, name) },
		})
	}
	for _, ep := range po.Endpoints {
		if !ports[ep.ID] {
			d.problem(problem{
				what: fmt.Sprintf("%s: endpoint %s (%s) has no port on br0: its container is cut off (or is starting or stopping right now)", label, short(ep.ID), ep.IPv4),
				fix:  "if it persists, restart the container of that endpoint (docker network inspect lists the endpoints)",
			})
		}
	}
	return devicesOK
}

// checkVXLAN checks vxlan0: VNI, source address, port, learning off, and
// as any port of br0.
func (d *doctorRun) checkVXLAN(vx, br netlink.Link, vni uint32, mtu int, bad func(string)) {
	if vx == nil {
		bad("VXLAN device vxlan0 is missing")
		return
	}
	v, ok := vx.(*netlink.Vxlan)
	if !ok {
		bad(fmt.Sprintf("vxlan0 is a %s device, not vxlan", vx.Type()))
		return
	}
	switch {
	case v.VxlanId != int(vni):
		bad(fmt.Sprintf("vxlan0 has VNI %d, want %d", v.VxlanId, vni))
	case !v.SrcAddr.Equal(net.IP(d.addr.AsSlice())):
		bad(fmt.Sprintf("vxlan0 sends from %s, want %s", v.SrcAddr, d.addr))
	case v.Port != overlay.VXLANPort:
		bad(fmt.Sprintf("vxlan0 uses UDP port %d, want %d", v.Port, overlay.VXLANPort))
	case v.Learning:
		bad("vxlan0 learns MACs from traffic; it must only have the entries the plugin programs")
	}
	checkLink(v, mtu, br, bad)
}

// checkLink reports a device that is down, has the wrong MTU, or (when
// master is set) is not a port of master.
func checkLink(l netlink.Link, mtu int, master netlink.Link, bad func(string)) {
	a := l.Attrs()
	if a.Flags&net.FlagUp == 0 {
		bad(a.Name + " is down")
	}
	if mtu > 0 && a.MTU != mtu {
		bad(fmt.Sprintf("%s has MTU %d, want %d", a.Name, a.MTU, mtu))
	}
	if master != nil && a.MasterIndex != master.Attrs().Index {
		bad(a.Name + " is not a port of br0")
	}
}

// checkGateways compares br0's global addresses with the overlay's gateways.
func (d *doctorRun) checkGateways(h *netlink.Handle, br netlink.Link, po driver.PlannedOverlay, bad func(string)) {
	want := map[netip.Prefix]bool{}
	for i, gw := range po.Gateways {
		if gw.IsValid() && i < len(po.Subnets) {
			want[netip.PrefixFrom(gw, po.Subnets[i].Bits())] = true
		}
	}
	addrs, err := h.AddrList(br, netlink.FAMILY_ALL)
	if err != nil {
		bad(fmt.Sprintf("list br0 addresses: %v", err))
		return
	}
	have := map[netip.Prefix]bool{}
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if !ok || ip.IsLinkLocalUnicast() {
			continue
		}
		ones, _ := a.Mask.Size()
		p := netip.PrefixFrom(ip.Unmap(), ones)
		have[p] = true
		if !want[p] {
			bad(fmt.Sprintf("br0 has address %s, which is no gateway of the overlay", p))
		}
	}
	for p := range want {
		if !have[p] {
			bad(fmt.Sprintf("br0 lacks the gateway address %s", p))
		}
	}
}

// checkPeers compares the forwarding and neighbour entries the plugin owns
// with the overlay's peers; it returns how many of each it expects.
func (d *doctorRun) checkPeers(po driver.PlannedOverlay, label string, st *overlay.State) (int, int) {
	wantFDB, wantNeigh := map[string]bool{}, map[string]bool{}
	zero := net.HardwareAddr{0, 0, 0, 0, 0, 0}
	for _, p := range po.Peers {
		wantFDB[overlay.FDBEntry{MAC: zero, Dst: p.Host, Self: true, State: "permanent"}.String()] = true
		wantFDB[overlay.FDBEntry{MAC: p.MAC, Dst: p.Host, Self: true, State: "permanent"}.String()] = true
		wantFDB[overlay.FDBEntry{MAC: p.MAC, State: "static"}.String()] = true
		for _, ip := range p.IPs {
			wantNeigh[overlay.NeighEntry{IP: ip, MAC: p.MAC, State: "permanent"}.String()] = true
		}
	}
	haveFDB, haveNeigh := map[string]bool{}, map[string]bool{}
	for _, e := range st.FDB {
		// The entries the plugin owns: the VXLAN device's own table, and
		// static bridge entries on the VXLAN port.
		if (e.Self && e.Dst.IsValid()) || (!e.Self && e.State == "static") {
			haveFDB[e.String()] = true
		}
	}
	for _, e := range st.Neigh {
		if e.State == "permanent" {
			haveNeigh[e.String()] = true
		}
	}
	report := func(kind string, want, have map[string]bool) {
		for _, e := range sortedKeys(want) {
			if !have[e] {
				d.problem(problem{what: fmt.Sprintf("%s: %s entry missing: %s", label, kind, e), fix: fixReconcile, reconcile: true})
			}
		}
		for _, e := range sortedKeys(have) {
			if !want[e] {
				d.problem(problem{
					what:      fmt.Sprintf("%s: stale %s entry: %s (no endpoint of a live host matches it)", label, kind, e),
					fix:       `"docker-net-plugin doctor --fix" (or restarting the plugin) removes it`,
					reconcile: true,
				})
			}
		}
	}
	report("forwarding (bridge fdb)", wantFDB, haveFDB)
	report("neighbour", wantNeigh, haveNeigh)
	return len(wantFDB), len(wantNeigh)
}

func sortedKeys(m map[string]bool) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// openNS returns a netlink handle in the namespace bound at path.
func openNS(path string) (*netlink.Handle, func(), error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, nil, fmt.Errorf("open namespace %s: %w", path, err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		ns.Close()
		return nil, nil, fmt.Errorf("netlink in namespace %s: %w", path, err)
	}
	if err := h.SetSocketTimeout(10 * time.Second); err != nil {
		h.Close()
		ns.Close()
		return nil, nil, fmt.Errorf("netlink in namespace %s: %w", path, err)
	}
	return h, func() { h.Close(); ns.Close() }, nil
}

// deleteLink deletes the device name from the namespace bound at path.
func deleteLink(path, name string) error {
	h, closeNS, err := openNS(path)
	if err != nil {
		return err
	}
	defer closeNS()
	l, err := h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil // gone already
		}
		return fmt.Errorf("find %s: %w", name, err)
	}
	if err := h.LinkDel(l); err != nil {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// underlayMTU is the MTU and name of the device of this namespace holding
// addr; 0 when none does.
func underlayMTU(addr netip.Addr) (int, string) {
	family := netlink.FAMILY_V4
	if addr.Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := netlink.AddrList(nil, family)
	if err != nil {
		return 0, ""
	}
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == addr {
			if l, err := netlink.LinkByIndex(a.LinkIndex); err == nil {
				return l.Attrs().MTU, l.Attrs().Name
			}
		}
	}
	return 0, ""
}
