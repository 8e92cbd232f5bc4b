package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dnplabs/docker-net-plugin/driver"
	"github.com/dnplabs/docker-net-plugin/store"
)

// status prints the cluster as the store records it.
func status(ctx context.Context, w io.Writer, args []string) error {
	var sc store.Config
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	addStoreFlags(fs, &sc)
	staleAfter := fs.Duration("stale-after", driver.DefaultStaleAfter, "the plugins' grace period before a gone host's records are purged (for the PURGE column)")
	if err := envFlags(fs); err != nil { // the plugin's own settings, not the ones below
		return err
	}
	asJSON := fs.Bool("json", false, "print JSON instead of tables")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("status takes no arguments, got %q", fs.Args())
	}
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	st, err := openStore(ctx, sc)
	if err != nil {
		return err
	}
	defer st.Close()
	cs, err := driver.ReadCluster(ctx, st)
	if cs == nil {
		return err
	}
	cs.MarkStale(*staleAfter, time.Now())
	if *asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		if werr := enc.Encode(cs); werr != nil {
			return werr
		}
	} else {
		printStatus(w, cs, time.Now())
	}
	return err // records that could not be decoded, if any
}

func printStatus(w io.Writer, cs *driver.ClusterState, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "HOSTS")
	fmt.Fprintln(tw, "ADDRESS\tNAME\tALIVE\tLAST SEEN\tUP SINCE\tNETWORKS\tENDPOINTS\tORPHANS\tPURGE")
	for _, h := range cs.Hosts {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\n", h.Address, dash(h.Name), yesNo(h.Alive),
			ago(h.LastSeen, now), stamp(h.Started), h.Networks, h.Endpoints, h.Orphans, purge(h, now))
	}
	if len(cs.Hosts) == 0 {
		fmt.Fprintln(tw, "(none)")
	}

	fmt.Fprintln(tw, "\nOVERLAYS")
	fmt.Fprintln(tw, "NAME\tVNI\tENCAP\tSUBNETS\tGATEWAYS\tMTU\tHOSTS\tENDPOINTS")
	for _, ov := range cs.Overlays {
		if ov.Missing {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t-\t%d (overlay record missing)\n", ov.Name, len(ov.Endpoints))
			continue
		}
		mtu := "auto"
		if ov.MTU != 0 {
			mtu = fmt.Sprint(ov.MTU)
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\t%d\t%d\n", ov.Name, ov.VNI, ov.Encap,
			list(ov.Subnets), list(ov.Gateways), mtu, len(ov.Hosts), len(ov.Endpoints))
	}
	if len(cs.Overlays) == 0 {
		fmt.Fprintln(tw, "(none)")
	}

	fmt.Fprintln(tw, "\nENDPOINTS")
	fmt.Fprintln(tw, "OVERLAY\tHOST\tENDPOINT\tNETWORK\tIP\tIPV6\tMAC")
	n := 0
	for _, ov := range cs.Overlays {
		for _, ep := range ov.Endpoints {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", ov.Name, ep.Host, short(ep.ID), short(ep.Network),
				dash(ep.IPv4), dash(ep.IPv6), ep.MAC)
			n++
		}
	}
	if n == 0 {
		fmt.Fprintln(tw, "(none)")
	}

	fmt.Fprintln(tw, "\nORPHANED ENDPOINTS (of lost hosts; restored when the host returns)")
	fmt.Fprintln(tw, "OVERLAY\tHOST\tENDPOINT\tNETWORK\tIP\tMAC\tSTATE")
	for _, o := range cs.Orphans {
		state := "waiting for its host"
		if o.Conflict != "" {
			state = "CUT OFF since " + stamp(o.ConflictSince) + ": " + o.Conflict + "; re-create its container"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", o.Overlay, o.Host, short(o.ID), short(o.Network), dash(o.IPv4), o.MAC, state)
	}
	if len(cs.Orphans) == 0 {
		fmt.Fprintln(tw, "(none)")
	}
	printProblems(tw, cs.Problems)
	tw.Flush()
}

// printProblems lists the endpoint records the hosts skip, if any.
func printProblems(tw io.Writer, ps []driver.RecordProblem) {
	if len(ps) == 0 {
		return
	}
	fmt.Fprintln(tw, "\nPROBLEMS (endpoint records the hosts skip; the rest of each overlay works)")
	fmt.Fprintln(tw, "OVERLAY\tHOST\tENDPOINT\tIP\tMAC\tWHY")
	for _, p := range ps {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", p.Overlay, p.Host, short(p.Endpoint), dash(p.IPv4), dash(p.MAC), p.Reason)
	}
}

// purge says when a gone host's records are purged.
func purge(h driver.HostInfo, now time.Time) string {
	switch {
	case h.Alive || h.PurgeAt.IsZero():
		return "-"
	case h.Stale:
		return "due now (stale)"
	}
	return "in " + h.PurgeAt.Sub(now).Round(time.Second).String()
}

func short(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func list(s []string) string {
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, ",")
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format(time.RFC3339)
}

// ago prints a time as how long before now it was.
func ago(t, now time.Time) string {
	if t.IsZero() {
		return "unknown"
	}
	d := now.Sub(t).Round(time.Second)
	if d < time.Second {
		return "just now"
	}
	return d.String() + " ago"
}
