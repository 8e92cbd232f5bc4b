package testenv

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
)

// Cluster is a store cluster of several servers (members) started for a
// test: an etcd cluster, a ZooKeeper ensemble or a Consul server cluster.
// Each member is a Process of its own: Kill one (SIGKILL) and Start it
// again with the same data, as a crashed server that comes back would.
// Every member is stopped when the test ends.
type Cluster struct {
	Scheme  string // etcd, zk or consul
	Members []*Member

	isLeader func(m *Member) (bool, error)
}

// Member is one server of a Cluster.
type Member struct {
	*Process
	Name  string // m1, m2, ...
	IP    string // the address it listens on
	NetNS string // the namespace it runs in ("" for the test's own)
	Addr  string // host:port its clients use
	// SerfAddr is a Consul server's LAN gossip address (host:port), what
	// client agents join; empty for other stores.
	SerfAddr string
}

// URL is the multi-server store URL of the cluster under prefix, e.g.
// etcd://10.0.0.1:2379,10.0.0.2:2379,10.0.0.3:2379/prefix.
func (c *Cluster) URL(prefix string) string {
	addrs := make([]string, len(c.Members))
	for i, m := range c.Members {
		addrs[i] = m.Addr
	}
	return c.Scheme + "://" + strings.Join(addrs, ",") + "/" + prefix
}

// Leader returns the running member that says it is the leader now. It
// fails unless exactly one does.
func (c *Cluster) Leader() (*Member, error) {
	var leaders []*Member
	var errs []string
	for _, m := range c.Members {
		if !m.Running() {
			continue
		}
		ok, err := c.isLeader(m)
		if err != nil {
			errs = append(errs, fmt.Sprintf("%s: %v", m.Name, err))
			continue
		}
		if ok {
			leaders = append(leaders, m)
		}
	}
	if len(leaders) != 1 {
		return nil, fmt.Errorf("%s cluster: %d members say they lead (errors: %s)", c.Scheme, len(leaders), strings.Join(errs, "; "))
	}
	return leaders[0], nil
}

// WaitLeader waits up to d for Leader to name one member.
func (c *Cluster) WaitLeader(d time.Duration) (*Member, error) {
	deadline := time.Now().Add(d)
	for {
		m, err := c.Leader()
		if err == nil || time.Now().After(deadline) {
			return m, err
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stop stops every member (SIGTERM).
func (c *Cluster) Stop(t testing.TB) {
	t.Helper()
	for _, m := range c.Members {
		m.Stop(t)
	}
}

// startAll starts the members at once (each waits for a quorum of the
// others before it counts as ready) and stops them when the test ends.
func (c *Cluster) startAll(t testing.TB) {
	t.Helper()
	t.Cleanup(func() { c.Stop(t) })
	errs := make([]error, len(c.Members))
	var wg sync.WaitGroup
	for i, m := range c.Members {
		wg.Go(func() { errs[i] = m.start() })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("start %s member %s: %v", c.Scheme, c.Members[i].Name, err)
		}
	}
}

// needMembers checks a cluster's member list.
func needMembers(t testing.TB, kind string, members []ServerOptions) {
	t.Helper()
	if len(members) == 0 {
		t.Fatalf("%s cluster: no members", kind)
	}
}

// StartEtcdCluster runs an etcd cluster with one member per entry of
// members (its IP and namespace), each on free ports with its own data
// directory, and waits until every member is healthy (has a leader).
// Members may share an IP: their ports differ. Apart from the addresses,
// etcd runs with its defaults (heartbeat 100 ms, election timeout 1 s).
func StartEtcdCluster(t testing.TB, members []ServerOptions) *Cluster {
	t.Helper()
	needMembers(t, "etcd", members)
	bin := LookPath(t, "etcd", "/usr/bin")
	c := &Cluster{Scheme: "etcd"}
	var peers []string
	type urls struct{ client, peer string }
	var us []urls
	for i, o := range members {
		ports := freePorts(t, 2)
		u := urls{
			client: "http://" + net.JoinHostPort(o.Host(), strconv.Itoa(ports[0])),
			peer:   "http://" + net.JoinHostPort(o.Host(), strconv.Itoa(ports[1])),
		}
		us = append(us, u)
		peers = append(peers, fmt.Sprintf("m%d=%s", i+1, u.peer))
	}
	token := RandomName("dnp-etcd-")
	for i, o := range members {
		name := fmt.Sprintf("m%d", i+1)
		dir := t.TempDir()
		args := []string{bin,
			"--name", name,
			"--data-dir", filepath.Join(dir, "data"),
			"--listen-client-urls", us[i].client,
			"--advertise-client-urls", us[i].client,
			"--listen-peer-urls", us[i].peer,
			"--initial-advertise-peer-urls", us[i].peer,
			"--initial-cluster", strings.Join(peers, ","),
			"--initial-cluster-token", token,
			"--initial-cluster-state", "new",
			"--logger", "zap",
			"--log-outputs", "stderr",
		}
		hc := httpClientIn(o.NetNS, time.Second)
		m := &Member{
			Process: &Process{&kvserver.Process{
				Name:  "etcd-" + name,
				Args:  o.Command(args),
				Dir:   dir,
				Ready: kvserver.EtcdHealthy(hc, us[i].client),
				Wait:  60 * time.Second,
			}},
			Name:  name,
			IP:    o.Host(),
			NetNS: o.NetNS,
			Addr:  strings.TrimPrefix(us[i].client, "http://"),
		}
		c.Members = append(c.Members, m)
	}
	c.isLeader = func(m *Member) (bool, error) {
		return etcdIsLeader(httpClientIn(m.NetNS, time.Second), "http://"+m.Addr)
	}
	c.startAll(t)
	return c
}

// etcdIsLeader asks a member for its status (the v3 gateway's
// /v3/maintenance/status): it leads when its own ID is the leader's.
func etcdIsLeader(hc *http.Client, clientURL string) (bool, error) {
	resp, err := hc.Post(clientURL+"/v3/maintenance/status", "application/json", strings.NewReader("{}"))
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	var st struct {
		Header struct {
			MemberID string `json:"member_id"`
		} `json:"header"`
		Leader string `json:"leader"`
	}
	if err := json.Unmarshal(body, &st); err != nil || st.Header.MemberID == "" {
		return false, fmt.Errorf("status answered %s %q", resp.Status, body)
	}
	return st.Leader == st.Header.MemberID, nil
}

// StartCluster starts a cluster of kind etcd, zk or consul with one
// server per entry of members, as StartEtcdCluster, StartZooKeeperEnsemble
// or StartConsulCluster do.
func StartCluster(t testing.TB, kind string, members []ServerOptions) *Cluster {
	t.Helper()
	switch kind {
	case "etcd":
		return StartEtcdCluster(t, members)
	case "zk":
		return StartZooKeeperEnsemble(t, members)
	case "consul":
		return StartConsulCluster(t, members)
	}
	t.Fatalf("unknown store kind %q (etcd, zk or consul)", kind)
	return nil
}

// StartZooKeeperEnsemble runs a ZooKeeper ensemble with one server per
// entry of members (its IP and namespace), each with its own client,
// quorum and election ports and data directory, and waits until every
// server serves clients (a leader is elected and they have synced).
// Servers may share an IP: their ports differ. Settings as
// StartZooKeeper (tickTime 200 ms), with syncLimit 5 ticks (1 s).
func StartZooKeeperEnsemble(t testing.TB, members []ServerOptions) *Cluster {
	t.Helper()
	needMembers(t, "zk", members)
	java := LookPath(t, "java")
	for _, jar := range []string{zkJar, slf4jJar} {
		if _, err := os.Stat(jar); err != nil {
			Missing(t, "%s not found (apt-get install zookeeper libslf4j-java)", jar)
		}
	}
	c := &Cluster{Scheme: "zk"}
	var servers []string
	var clientPorts []int
	for i, o := range members {
		ports := freePorts(t, 3)
		clientPorts = append(clientPorts, ports[0])
		servers = append(servers, fmt.Sprintf("server.%d=%s:%d:%d", i+1, o.Host(), ports[1], ports[2]))
	}
	for i, o := range members {
		name := fmt.Sprintf("m%d", i+1)
		dir := t.TempDir()
		data := filepath.Join(dir, "data")
		if err := os.MkdirAll(data, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(data, "myid"), []byte(strconv.Itoa(i+1)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg := []string{
			"tickTime=200",
			"initLimit=50",
			"syncLimit=5",
			"minSessionTimeout=400",
			"maxSessionTimeout=60000",
			"dataDir=" + data,
			"clientPort=" + strconv.Itoa(clientPorts[i]),
			"clientPortAddress=" + o.Host(),
			"maxClientCnxns=0",
			"admin.enableServer=false",
			"4lw.commands.whitelist=srvr,ruok,stat,mntr",
		}
		cfg = append(cfg, servers...)
		if err := os.WriteFile(filepath.Join(dir, "zoo.cfg"), []byte(strings.Join(cfg, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		addr := net.JoinHostPort(o.Host(), strconv.Itoa(clientPorts[i]))
		m := &Member{
			Process: &Process{&kvserver.Process{
				Name: "zookeeper-" + name,
				// Three JVMs share two cores with everything else: the
				// serial collector and the C1 compiler start them fast.
				// A server that starts late must not find its peers
				// waiting up to a minute between election rounds
				// (the interval doubles from 200 ms): at most 1 s.
				Args: o.Command([]string{java, "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
					"-Dzookeeper.fastleader.maxNotificationInterval=1000",
					"-cp", zkJar + ":" + slf4jJar,
					"org.apache.zookeeper.server.quorum.QuorumPeerMain", "zoo.cfg"}),
				Dir:     dir,
				Ready:   zkReady(addr, o.NetNS),
				Wait:    60 * time.Second,
				Prepare: zkDropTornLogs(data),
			}},
			Name:  name,
			IP:    o.Host(),
			NetNS: o.NetNS,
			Addr:  addr,
		}
		c.Members = append(c.Members, m)
	}
	c.isLeader = func(m *Member) (bool, error) {
		out, err := zkCommand(m.NetNS, m.Addr, "srvr")
		if err != nil {
			return false, err
		}
		return strings.Contains(out, "Mode: leader"), nil
	}
	c.startAll(t)
	return c
}

// zkCommand sends a four-letter command to a ZooKeeper server and returns
// its answer.
func zkCommand(nsPath, addr, cmd string) (string, error) {
	conn, err := dialIn(nsPath, addr, 500*time.Millisecond)
	if err != nil {
		return "", err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte(cmd)); err != nil {
		return "", err
	}
	out, err := io.ReadAll(conn)
	return string(out), err
}

// StartConsulCluster runs a Consul cluster of server agents, one per entry
// of members (its IP and namespace), on free ports with their own data
// directories (-bootstrap-expect N, each joining the others), and waits
// until a KV write goes through each of them. Servers may share an IP:
// their ports differ. As StartConsul: raft_multiplier 1, no DNS, no gRPC,
// no update check. The binary is found as StartConsul finds it.
func StartConsulCluster(t testing.TB, members []ServerOptions) *Cluster {
	t.Helper()
	needMembers(t, "consul", members)
	bin := consulBinary(t)
	c := &Cluster{Scheme: "consul"}
	type portSet struct{ http, serfLAN, serfWAN, server int }
	var ps []portSet
	for range members {
		p := freePorts(t, 4)
		ps = append(ps, portSet{p[0], p[1], p[2], p[3]})
	}
	raftAddrs := map[*Member]string{}
	for i, o := range members {
		name := fmt.Sprintf("m%d", i+1)
		dir := t.TempDir()
		args := []string{bin, "agent",
			"-server",
			"-bootstrap-expect", strconv.Itoa(len(members)),
			"-node", name,
			"-disable-host-node-id",
			"-bind", o.Host(),
			"-client", o.Host(),
			"-data-dir", filepath.Join(dir, "data"),
			"-http-port", strconv.Itoa(ps[i].http),
			"-serf-lan-port", strconv.Itoa(ps[i].serfLAN),
			"-serf-wan-port", strconv.Itoa(ps[i].serfWAN),
			"-server-port", strconv.Itoa(ps[i].server),
			"-dns-port", "-1",
			"-grpc-port", "-1",
			"-grpc-tls-port", "-1",
			"-hcl", "performance { raft_multiplier = 1 }",
			"-hcl", "disable_update_check = true",
		}
		for j, p := range members {
			if j != i {
				args = append(args, "-retry-join", net.JoinHostPort(p.Host(), strconv.Itoa(ps[j].serfLAN)))
			}
		}
		httpAddr := net.JoinHostPort(o.Host(), strconv.Itoa(ps[i].http))
		m := &Member{
			Process: &Process{&kvserver.Process{
				Name:  "consul-" + name,
				Args:  o.Command(args),
				Dir:   dir,
				Ready: consulWrites(httpClientIn(o.NetNS, time.Second), "http://"+httpAddr, ""),
				Wait:  60 * time.Second,
			}},
			Name:     name,
			IP:       o.Host(),
			NetNS:    o.NetNS,
			Addr:     httpAddr,
			SerfAddr: net.JoinHostPort(o.Host(), strconv.Itoa(ps[i].serfLAN)),
		}
		raftAddrs[m] = net.JoinHostPort(o.Host(), strconv.Itoa(ps[i].server))
		c.Members = append(c.Members, m)
	}
	c.isLeader = func(m *Member) (bool, error) {
		// Only a member's own view counts: a follower may still name
		// a leader that died a moment ago.
		hc := httpClientIn(m.NetNS, time.Second)
		resp, err := hc.Get("http://" + m.Addr + "/v1/status/leader")
		if err != nil {
			return false, err
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		var leader string
		if err := json.Unmarshal(body, &leader); err != nil {
			return false, fmt.Errorf("/v1/status/leader answered %s %q", resp.Status, body)
		}
		if leader != raftAddrs[m] {
			return false, nil
		}
		return consulIsLeader(hc, "http://"+m.Addr)
	}
	c.startAll(t)
	return c
}

// consulIsLeader asks an agent whether its raft state is Leader.
func consulIsLeader(hc *http.Client, base string) (bool, error) {
	resp, err := hc.Get(base + "/v1/agent/self")
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var self struct {
		Stats map[string]map[string]string `json:"Stats"`
	}
	if err := json.Unmarshal(body, &self); err != nil {
		return false, fmt.Errorf("/v1/agent/self answered %s: %v", resp.Status, err)
	}
	return self.Stats["raft"]["state"] == "Leader", nil
}

// StartConsulAgent runs a Consul client agent (not a server) that joins
// the servers of cluster, as users run one on every Docker host, and waits
// until a KV write goes through it. It binds (gossips) on o.IP; its HTTP
// API listens on 127.0.0.1:8500 inside o.NetNS (Consul's default address,
// which the plugin's URL then names), or on a free loopback port when
// o.NetNS is the test's own namespace. The returned Server's URL is the
// agent's store URL.
func StartConsulAgent(t testing.TB, cluster *Cluster, name string, o ServerOptions) *Server {
	t.Helper()
	bin := consulBinary(t)
	httpPort := 8500
	if o.NetNS == "" {
		httpPort = FreePort(t)
	}
	dir := t.TempDir()
	httpAddr := net.JoinHostPort("127.0.0.1", strconv.Itoa(httpPort))
	args := []string{bin, "agent",
		"-node", name,
		"-disable-host-node-id",
		"-bind", o.Host(),
		"-client", "127.0.0.1",
		"-data-dir", filepath.Join(dir, "data"),
		"-http-port", strconv.Itoa(httpPort),
		"-serf-lan-port", strconv.Itoa(FreePort(t)),
		"-dns-port", "-1",
		"-grpc-port", "-1",
		"-grpc-tls-port", "-1",
		"-hcl", "disable_update_check = true",
	}
	for _, m := range cluster.Members {
		args = append(args, "-retry-join", m.SerfAddr)
	}
	srv := &Server{
		Process: &Process{&kvserver.Process{
			Name:  "consul-agent-" + name,
			Args:  o.Command(args),
			Dir:   dir,
			Ready: consulWrites(httpClientIn(o.NetNS, time.Second), "http://"+httpAddr, ""),
			Wait:  60 * time.Second,
		}},
		Scheme: "consul",
		Addr:   httpAddr,
	}
	t.Cleanup(func() { srv.Stop(t) })
	srv.Start(t)
	return srv
}

// consulBinary is $CONSUL_BIN, /opt/dnp/bin/consul or consul on PATH.
func consulBinary(t testing.TB) string {
	t.Helper()
	bin := os.Getenv("CONSUL_BIN")
	if bin == "" {
		return LookPath(t, "consul", "/opt/dnp/bin")
	}
	if _, err := os.Stat(bin); err != nil {
		Missing(t, "CONSUL_BIN=%s: %v (run scripts/build-consul.sh)", bin, err)
	}
	return bin
}

// httpClientIn is an HTTP client whose connections are opened inside the
// network namespace at nsPath (the test's own when empty).
func httpClientIn(nsPath string, timeout time.Duration) *http.Client {
	return &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return dialIn(nsPath, addr, timeout)
			},
			DisableKeepAlives: true,
		},
	}
}
