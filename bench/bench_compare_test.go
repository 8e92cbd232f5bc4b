package bench

import (
	"compress/gzip"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/overlay"
)

// pairCase is one way for container 1 on host 1 and container 2 on host 2
// to reach each other, measured side by side in the throughput and latency
// benchmarks.
type pairCase struct {
	Name       string // row name
	Container1 string // container on host 1 (docker exec)
	NS1, NS2   string // the containers' network namespaces
	IP2        string // container 2's address
	// Unavailable, when set, says why the case cannot be measured here.
	Unavailable string
}

// comparisons returns the cases of x's two hosts: the plugin's overlay
// (x's own containers), the plugin's encrypted overlay, and Docker's own
// overlay driver in swarm mode, plain and --opt encrypted, each with a
// container on each host. Docker's encrypted overlay needs ESP in the
// kernel; where it carries no traffic its case says why.
func (x *twoHosts) comparisons(t *testing.T) []pairCase {
	t.Helper()
	cases := []pairCase{{Name: "overlay (encap=vxlan)", Container1: "c1", NS1: x.ns1, NS2: x.ns2, IP2: x.ip2}}
	pair := func(name, network, prefix string) pairCase {
		runContainer(t, x.h1, prefix+"1", network)
		ip2 := runContainer(t, x.h2, prefix+"2", network)
		return pairCase{Name: name, Container1: prefix + "1", IP2: ip2,
			NS1: containerNetNS(t, x.h1, prefix+"1"), NS2: containerNetNS(t, x.h2, prefix+"2")}
	}
	reaches := func(p pairCase, within time.Duration) bool {
		for deadline := time.Now().Add(within); time.Now().Before(deadline); {
			if _, err := x.h1.Docker("exec", p.Container1, "ping", "-c", "1", "-W", "1", p.IP2); err == nil {
				return true
			}
		}
		return false
	}

	for _, h := range x.c.Hosts {
		overlayNetwork(t, h, "benc", "10.77.0.0/24", "-o", "encrypted")
	}
	enc := pair("overlay, -o encrypted (AES-256-GCM)", "benc", "e")
	if !reaches(enc, 30*time.Second) {
		t.Fatal("the plugin's encrypted overlay carries no traffic")
	}
	cases = append(cases, enc)

	// Docker's own overlay driver: attachable swarm networks, containers
	// by docker run (the plugin's networks are local-scope and unaffected).
	if err := x.c.FormSwarm(x.h1, x.h2); err != nil {
		t.Fatal(err)
	}
	x.h1.MustDocker(t, "network", "create", "-d", "overlay", "--attachable", "--subnet", "10.78.0.0/24", "dockov")
	dock := pair("Docker overlay driver (swarm)", "dockov", "d")
	if !reaches(dock, 30*time.Second) {
		t.Fatal("Docker's overlay driver carries no traffic")
	}
	cases = append(cases, dock)

	dockEnc := pairCase{Name: "Docker overlay driver (swarm), --opt encrypted"}
	if _, err := x.h1.Docker("network", "create", "-d", "overlay", "--attachable", "--opt", "encrypted", "--subnet", "10.79.0.0/24", "dockenc"); err != nil {
		dockEnc.Unavailable = "network create failed: " + oneLine(lastPart(err.Error()))
	} else {
		p := pair(dockEnc.Name, "dockenc", "x")
		if reaches(p, 10*time.Second) {
			dockEnc = p
		} else {
			dockEnc.Unavailable = "cannot run on this kernel: its containers get no traffic through (Docker's encrypted overlay is IPsec ESP in the kernel; " + kernelESP() + ")"
		}
	}
	cases = append(cases, dockEnc)
	return cases
}

// kernelESP says what this kernel has of what kernel IPsec with AES-GCM
// needs, from its configuration.
func kernelESP() string {
	cfg, err := kernelConfig()
	if err != nil {
		return "kernel configuration unreadable: " + err.Error()
	}
	var found []string
	for _, opt := range []string{"CONFIG_INET_ESP", "CONFIG_CRYPTO_GCM"} {
		v := "not set"
		for _, line := range strings.Split(cfg, "\n") {
			if strings.HasPrefix(line, opt+"=") {
				v = "=" + strings.TrimPrefix(line, opt+"=")
			}
		}
		found = append(found, opt+" "+v)
	}
	return strings.Join(found, ", ")
}

func kernelConfig() (string, error) {
	f, err := os.Open("/proc/config.gz")
	if err != nil {
		return "", err
	}
	defer f.Close()
	z, err := gzip.NewReader(f)
	if err != nil {
		return "", err
	}
	b, err := io.ReadAll(z)
	return string(b), err
}

// encryptionNote is the benchmark note on how the encrypted overlay works.
func encryptionNote() string {
	return "-o encrypted: each VXLAN packet between hosts is sealed with AES-256-GCM by the plugin's encryption data path " +
		"(a user-space process behind a TUN device; this kernel has no ESP for kernel IPsec), " +
		"and the container MTU is " + strconv.Itoa(1500-50-overlay.EncryptionOverhead) + " (1500 - 50 VXLAN - 40 encryption)."
}

// compareRows makes a row per case (prefix + its name) with the underlay
// samples as baseline; the plugin's rows are drawn in chart.
func compareRows(cases []pairCase, samples [][]float64, under []float64, prefix, unit, chart string) []Row {
	var rows []Row
	for i, c := range cases {
		row := Row{Name: prefix + c.Name, Unit: unit}
		if c.Unavailable != "" {
			row.Unavailable = c.Unavailable
		} else {
			row.Samples, row.BaseName, row.Base = samples[i], "host to host, underlay", under
			if !strings.HasPrefix(c.Name, "Docker") {
				row.Chart = chart
			}
		}
		rows = append(rows, row)
	}
	return rows
}

// compareNote compares the plugin's encrypted overlay with Docker's
// overlay (plain and encrypted), median against median.
func compareNote(cases []pairCase, samples [][]float64, what string) string {
	idx := map[string]int{}
	for i, c := range cases {
		idx[c.Name] = i
	}
	med := func(name string) float64 {
		i, ok := idx[name]
		if !ok || len(samples[i]) == 0 {
			return 0
		}
		return Summarize(samples[i]).Median
	}
	enc, plain := med("overlay, -o encrypted (AES-256-GCM)"), med("overlay (encap=vxlan)")
	dock, dockEnc := med("Docker overlay driver (swarm)"), med("Docker overlay driver (swarm), --opt encrypted")
	var parts []string
	if enc > 0 && dock > 0 {
		parts = append(parts, fmt.Sprintf("%s: the plugin's encrypted overlay is %s of Docker's plain overlay (the plugin's plain overlay %s)",
			what, formatRatio(enc/dock), formatRatio(plain/dock)))
	}
	if enc > 0 && dockEnc > 0 {
		parts = append(parts, fmt.Sprintf("of Docker's encrypted overlay %s", formatRatio(enc/dockEnc)))
	} else {
		parts = append(parts, "Docker's encrypted overlay: no number (see its row)")
	}
	return strings.Join(parts, "; ") + "."
}
