package integration

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
	"github.com/dnplabs/docker-net-plugin/names"
)

// namesDNS is the daemon.json "dns" list docs/names.md asks for: the
// plugin's name server first, then the host's usual resolvers (here the
// switch, where stubResolver answers).
func namesDNS(c *harness.Cluster) []string {
	return []string{names.DefaultAddr.String(), c.SwitchIP}
}

// outsideName is the one name the outside world (stubResolver) knows.
const (
	outsideName = "outside.test"
	outsideAddr = "203.0.113.7"
)

// stubResolver runs a DNS server on the switch's address, the hosts'
// usual resolver: it answers outsideName and NXDOMAIN for everything
// else. Nothing is sent anywhere: the answer is just data.
func stubResolver(t *testing.T, c *harness.Cluster) {
	t.Helper()
	var (
		pc net.PacketConn
		l  net.Listener
	)
	err := harness.DoIn(c.SwitchNetNS, func() error {
		var err error
		if pc, err = net.ListenPacket("udp4", c.SwitchIP+":53"); err != nil {
			return err
		}
		l, err = net.Listen("tcp4", c.SwitchIP+":53")
		return err
	})
	if err != nil {
		t.Fatalf("stub resolver on the switch: %v", err)
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, q *dns.Msg) {
		resp := new(dns.Msg)
		resp.SetReply(q)
		resp.Authoritative = true
		if len(q.Question) == 1 && strings.EqualFold(q.Question[0].Name, outsideName+".") {
			if q.Question[0].Qtype == dns.TypeA {
				rr, _ := dns.NewRR(outsideName + ". 60 IN A " + outsideAddr)
				resp.Answer = append(resp.Answer, rr)
			}
		} else {
			resp.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(resp)
	})
	go (&dns.Server{PacketConn: pc, Handler: h}).ActivateAndServe()
	go (&dns.Server{Listener: l, Handler: h}).ActivateAndServe()
	t.Cleanup(func() { pc.Close(); l.Close() })
}

// ctrDNS asks Docker's embedded DNS of one container, as the container's
// own lookups do: from a socket in the container's network namespace to
// 127.0.0.11 (no docker exec, so each query takes milliseconds).
type ctrDNS struct {
	name  string
	netns string
}

func dnsOf(t *testing.T, h *harness.Host, container string) ctrDNS {
	t.Helper()
	pid := h.MustDocker(t, "inspect", "-f", "{{.State.Pid}}", container)
	return ctrDNS{name: container, netns: "/proc/" + pid + "/ns/net"}
}

func (d ctrDNS) ask(name string, qtype uint16) (*dns.Msg, error) {
	var conn net.Conn
	err := harness.DoIn(d.netns, func() error {
		var err error
		conn, err = net.Dial("udp", "127.0.0.11:53")
		return err
	})
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	// Docker gives each upstream server up to 4 s.
	resp, _, err := (&dns.Client{Timeout: 10 * time.Second}).ExchangeWithConn(q, &dns.Conn{Conn: conn})
	return resp, err
}

// lookup returns the sorted answers (addresses, or names for PTR) of a
// query, empty when the name does not resolve, or an error when DNS did
// not answer.
func (d ctrDNS) lookup(name string, qtype uint16) ([]string, error) {
	resp, err := d.ask(name, qtype)
	if err != nil {
		return nil, fmt.Errorf("%s: %s %s: %w", d.name, name, dns.TypeToString[qtype], err)
	}
	var out []string
	for _, rr := range resp.Answer {
		switch r := rr.(type) {
		case *dns.A:
			out = append(out, r.A.String())
		case *dns.AAAA:
			out = append(out, r.AAAA.String())
		case *dns.PTR:
			out = append(out, r.Ptr)
		}
	}
	slices.Sort(out)
	return out, nil
}

// want checks that name resolves (type qtype) to exactly want (nothing:
// does not resolve) from d, allowing within for it to become so.
func (d ctrDNS) want(t *testing.T, within time.Duration, what, name string, qtype uint16, want ...string) {
	t.Helper()
	slices.Sort(want)
	deadline := time.Now().Add(within)
	for {
		got, err := d.lookup(name, qtype)
		if err == nil && slices.Equal(got, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%s: %s %s from %s = %v (%v), want %v", what, name, dns.TypeToString[qtype], d.name, got, err, want)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// until polls name from d every 10 ms until ok(answers) and returns how
// long that took, or fails after within.
func (d ctrDNS) until(t *testing.T, within time.Duration, what, name string, ok func([]string) bool) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		got, err := d.lookup(name, dns.TypeA)
		if err == nil && ok(got) {
			return time.Since(start)
		}
		if time.Since(start) > within {
			t.Fatalf("%s: not within %s: %s from %s = %v (%v)", what, within, name, d.name, got, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// poller resolves name from d over and over in the background and counts
// the lookups that did not give want.
type poller struct {
	stop       chan struct{}
	done       chan struct{}
	mu         sync.Mutex
	total, bad int
	firstBad   time.Time
	lastBad    time.Time
	lastErr    string
}

func (d ctrDNS) poll(name string, want []string) *poller {
	p := &poller{stop: make(chan struct{}), done: make(chan struct{})}
	slices.Sort(want)
	go func() {
		defer close(p.done)
		for {
			select {
			case <-p.stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
			got, err := d.lookup(name, dns.TypeA)
			p.mu.Lock()
			p.total++
			if err != nil || !slices.Equal(got, want) {
				now := time.Now()
				if p.bad == 0 {
					p.firstBad = now
				}
				p.bad++
				p.lastBad = now
				p.lastErr = fmt.Sprintf("%v %v", got, err)
			}
			p.mu.Unlock()
		}
	}()
	return p
}

// end stops the poller and returns its counts and the span of failures.
func (p *poller) end() (total, bad int, span time.Duration, last string) {
	close(p.stop)
	<-p.done
	if p.bad > 0 {
		span = p.lastBad.Sub(p.firstBad) + 50*time.Millisecond
	}
	return p.total, p.bad, span, p.lastErr
}

// Projects as Compose runs them: each host its own project, the same
// networks block everywhere.

type namesNet struct {
	overlay, v4, v6 string
	internal        bool
}

var namesNets = map[string]namesNet{
	"blue":  {overlay: "nm-blue", v4: "10.51.0.0/24", v6: "fd00:51::/64"},
	"red":   {overlay: "nm-red", v4: "10.52.0.0/24"},
	"inner": {overlay: "nm-inner", v4: "10.53.0.0/24", internal: true},
}

// namesNetworksBlock is the Compose networks block every project uses.
func namesNetworksBlock(driver string) string {
	var b strings.Builder
	b.WriteString("networks:\n")
	for _, key := range []string{"blue", "red", "inner"} {
		n := namesNets[key]
		fmt.Fprintf(&b, "  %s:\n    driver: %s\n    driver_opts:\n      overlay: %s\n", key, driver, n.overlay)
		if n.internal {
			b.WriteString("    internal: true\n")
		}
		if n.v6 != "" {
			b.WriteString("    enable_ipv6: true\n")
		}
		fmt.Fprintf(&b, "    ipam:\n      driver: %s\n      config:\n        - subnet: %s\n", driver, n.v4)
		if n.v6 != "" {
			fmt.Fprintf(&b, "        - subnet: %s\n", n.v6)
		}
	}
	return b.String()
}

type namesSvc struct {
	name    string
	nets    []string // keys of namesNets
	aliases []string // more network aliases, on its first network
}

// projectUp starts a project's services on h with Compose (docker compose
// -p project up -d) when the engine has it, else with the docker commands
// Compose would run: networks <project>_<key>, containers
// <project>-<service>-1 with the service name as network alias.
func projectUp(t *testing.T, c *harness.Cluster, h *harness.Host, project string, svcs []namesSvc) {
	t.Helper()
	if c.Engine.Compose != "" {
		var b strings.Builder
		b.WriteString("services:\n")
		for _, s := range svcs {
			fmt.Fprintf(&b, "  %s:\n    image: %s\n    init: true\n    command: [\"sleep\", \"3600\"]\n    networks:\n", s.name, harness.Image)
			for i, n := range s.nets {
				if i == 0 && len(s.aliases) > 0 {
					fmt.Fprintf(&b, "      %s:\n        aliases: [%s]\n", n, strings.Join(s.aliases, ", "))
				} else {
					fmt.Fprintf(&b, "      %s: {}\n", n)
				}
			}
		}
		b.WriteString(namesNetworksBlock(pluginName))
		file := filepath.Join(h.Dir, project+"-compose.yaml")
		if err := os.WriteFile(file, []byte(b.String()), 0o644); err != nil {
			t.Fatal(err)
		}
		h.MustDocker(t, "compose", "-p", project, "-f", file, "up", "-d")
		return
	}
	for _, s := range svcs {
		for _, key := range s.nets {
			netName := project + "_" + key
			if _, err := h.Docker("network", "inspect", netName); err == nil {
				continue
			}
			n := namesNets[key]
			args := []string{"network", "create", "-d", pluginName, "--ipam-driver", pluginName, "--subnet", n.v4, "-o", "overlay=" + n.overlay}
			if n.v6 != "" {
				args = append(args, "--ipv6", "--subnet", n.v6)
			}
			if n.internal {
				args = append(args, "--internal")
			}
			h.MustDocker(t, append(args, netName)...)
		}
		ctr := project + "-" + s.name + "-1"
		args := []string{"run", "-d", "--init", "--name", ctr, "--network", project + "_" + s.nets[0], "--network-alias", s.name}
		for _, a := range s.aliases {
			args = append(args, "--network-alias", a)
		}
		h.MustDocker(t, append(args, harness.Image, "sleep", "3600")...)
		for _, key := range s.nets[1:] {
			h.MustDocker(t, "network", "connect", "--alias", s.name, project+"_"+key, ctr)
		}
	}
}

// ctrIP is a container's address on a network (IPv4, or IPv6 if v6).
func ctrIP(t *testing.T, h *harness.Host, container, network string, v6 bool) string {
	t.Helper()
	field := "IPAddress"
	if v6 {
		field = "GlobalIPv6Address"
	}
	ip := h.MustDocker(t, "inspect", "-f", `{{(index .NetworkSettings.Networks "`+network+`").`+field+`}}`, container)
	if net.ParseIP(ip) == nil {
		t.Fatalf("%s has no address on %s: %q", container, network, ip)
	}
	return ip
}
