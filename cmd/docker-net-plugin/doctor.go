package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"time"

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
		host:  &overlay.Host{Dir: hf.netnsDir, Prefix: hf.netnsPrefix},
		plane: driver.NewKernelPlane(addr, hf.netnsDir, hf.netnsPrefix).(driver.VerifyingPlane),
		dir:   hf.netnsDir, prefix: hf.netnsPrefix, enc: hf.encryption,
	}
	fmt.Fprintf(w, "checking host %s against %s (overlay namespaces %s)\n", addr, st.Endpoint(),
		d.host.NamespacePath("<vni>"))
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
	w    io.Writer
	st   store.Store
	addr netip.Addr
	// host is this host's overlays as their lock and names see them;
	// plane compares them with the store and removes what is stray.
	host        *overlay.Host
	plane       driver.VerifyingPlane
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
	var plane driver.DataPlane = d.plane
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
		fix := fmt.Sprintf("remove the container of endpoint %s on host %s (docker rm -f), or, if it has none, delete the record %s from the store",
			short(sk.Endpoint), sk.Host, driver.EndpointKey(sk.Overlay, sk.Endpoint))
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
	if dev, mtu, err := d.plane.Underlay(); err != nil {
		d.problem(problem{
			what: fmt.Sprintf("advertise address %s is on no device of this network namespace", d.addr),
			fix:  "run doctor on the host (or in the namespace) the plugin runs in, with the plugin's --advertise-addr",
		})
	} else if auto, err := d.plane.MaxMTU(overlay.EncapVXLAN, false); err != nil {
		d.problem(problem{
			what: fmt.Sprintf("underlay device %s has MTU %d: %v", dev, mtu, err),
			fix:  "raise the underlay device's MTU",
		})
	} else {
		d.ok("underlay device %s has MTU %d: overlays without -o mtu get %d", dev, mtu, auto)
	}

	d.checkHostVXLAN(plan.Overlays)
	kept := d.checkOrphans(plan.Orphans)
	if err := d.checkNamespaces(plan.Overlays, kept); err != nil {
		return err
	}
	for _, po := range plan.Overlays {
		d.checkOverlay(po)
	}
	if len(plan.Overlays) == 0 {
		d.ok("no overlay has an endpoint on this host: no overlay namespace expected")
	}
	d.note("iptables: nothing to compare: the plugin installs no rules (egress and published ports go through docker_gwbridge, which Docker programs; overlays are isolated by living in separate namespaces)")
	return nil
}

// checkOrphans reports this host's orphaned endpoints (their records were
// set aside while the host was lost) and returns the VNIs of the overlays
// whose namespaces they keep.
func (d *doctorRun) checkOrphans(orphans []driver.OrphanedEndpoint) map[uint32]bool {
	d.orphans = map[string]driver.OrphanedEndpoint{}
	kept := map[uint32]bool{}
	for _, o := range orphans {
		d.orphans[o.ID] = o
		if o.VNI != 0 {
			kept[o.VNI] = true
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
func (d *doctorRun) checkHostVXLAN(overlays []driver.PlannedOverlay) {
	problems, err := d.plane.VerifyHost(overlays)
	if err != nil {
		d.problem(problem{what: fmt.Sprintf("cannot list this namespace's devices: %v", err), fix: "run doctor as root"})
		return
	}
	for _, p := range problems {
		d.problem(problem{
			what: p.What,
			fix:  fmt.Sprintf("it is not the plugin's: delete it (ip link del %s) or give the overlay another VNI (-o vni=)", p.Device),
		})
	}
}

// checkNamespaces reports the overlay namespaces that neither an overlay
// with an endpoint on this host nor an orphaned endpoint needs.
func (d *doctorRun) checkNamespaces(overlays []driver.PlannedOverlay, kept map[uint32]bool) error {
	present, err := d.plane.Overlays()
	if err != nil {
		return fmt.Errorf("list overlay namespaces: %w", err)
	}
	wanted := map[uint32]bool{}
	for _, po := range overlays {
		wanted[po.VNI] = true
	}
	for _, vni := range present {
		switch {
		case wanted[vni]:
		case kept[vni]:
			d.note("overlay namespace %s stays for this host's orphaned endpoint(s)", d.plane.Namespace(vni))
		default:
			d.problem(problem{
				what:   fmt.Sprintf("stray overlay namespace %s: no overlay with an endpoint on this host uses it", d.plane.Namespace(vni)),
				fix:    "doctor --fix deletes it with every device in it",
				remove: func() error { return d.plane.RemoveOverlay(vni) },
			})
		}
	}
	return nil
}

// checkOverlay compares one overlay's kernel objects with the plan.
func (d *doctorRun) checkOverlay(po driver.PlannedOverlay) {
	label := fmt.Sprintf("overlay %s (vni %d)", po.Name, po.VNI)
	before := len(d.problems)
	ignore := make([]string, 0, len(d.orphans))
	for id := range d.orphans {
		ignore = append(ignore, id) // their interfaces are not stray
	}
	diff, err := d.plane.VerifyOverlay(po, ignore)
	switch {
	case errors.Is(err, overlay.ErrNotFound):
		d.problem(problem{
			what:      fmt.Sprintf("%s: namespace %s is missing although %d endpoint(s) of this host are on it", label, d.plane.Namespace(po.VNI), len(po.Endpoints)),
			fix:       fixReconcile + "; then restart the containers on it, whose interfaces went with the namespace",
			reconcile: true,
		})
		return
	case err != nil:
		d.problem(problem{what: fmt.Sprintf("%s: %v", label, err), fix: fixReconcile, reconcile: true})
		return
	}
	for _, p := range diff.Problems {
		d.problem(d.kernelProblem(label, po, p))
	}
	if len(d.problems) == before {
		hosts := map[netip.Addr]bool{}
		for _, p := range po.Peers {
			hosts[p.Host] = true
		}
		d.ok("%s: namespace, %s and %d endpoint port(s) as expected (MTU %d); %d forwarding and %d neighbour entries for %d peer(s) on %d other host(s)",
			label, diff.Devices, len(po.Endpoints), diff.MTU, diff.FDB, diff.Neigh, len(po.Peers), len(hosts))
	}
}

// kernelProblem is how doctor reports one difference of an overlay's
// kernel objects, and how --fix repairs it.
func (d *doctorRun) kernelProblem(label string, po driver.PlannedOverlay, p overlay.Problem) problem {
	switch {
	case p.Repair == overlay.RepairRemove:
		return problem{
			what:   label + ": " + p.What,
			fix:    "doctor --fix deletes it",
			remove: func() error { return d.plane.RemoveDevice(po.VNI, p.Device) },
		}
	case p.Repair == overlay.RepairRecreate && p.Kind == overlay.Missing:
		var ipv4 netip.Prefix
		for _, ep := range po.Endpoints {
			if ep.ID == p.Endpoint {
				ipv4 = ep.IPv4
			}
		}
		return problem{
			what: fmt.Sprintf("%s: endpoint %s (%s) %s", label, short(p.Endpoint), ipv4, p.What),
			fix:  "if it persists, restart the container of that endpoint (docker network inspect lists the endpoints)",
		}
	case p.Repair == overlay.RepairRecreate:
		return problem{
			what: fmt.Sprintf("%s: endpoint %s: %s", label, short(p.Endpoint), p.What),
			fix:  "restart the container of that endpoint",
		}
	case p.Kind == overlay.Extra:
		return problem{
			what:      fmt.Sprintf("%s: %s (no endpoint of a live host matches it)", label, p.What),
			fix:       `"docker-net-plugin doctor --fix" (or restarting the plugin) removes it`,
			reconcile: true,
		}
	}
	return problem{what: label + ": " + p.What, fix: fixReconcile, reconcile: true}
}
