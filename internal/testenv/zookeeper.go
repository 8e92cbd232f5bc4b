package testenv

import (
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"

	"github.com/dnplabs/docker-net-plugin/internal/kvserver"
)

// ZooKeeper's jars as Debian's zookeeper and libslf4j-java packages install them.
const (
	zkJar    = "/usr/share/java/zookeeper.jar"
	slf4jJar = "/usr/share/java/slf4j-simple.jar"
)

// StartZooKeeper starts a standalone ZooKeeper server with its own port and
// data directory, waits until it serves clients and stops it when the test
// ends. Stop and Start on the returned Server keep the data and the port.
//
// The server accepts any client; ACLs still apply, so a store using digest
// credentials (store.Config Username/Password) keeps its nodes private.
func StartZooKeeper(t testing.TB, o ServerOptions) *Server {
	t.Helper()
	return startZooKeeper(t, o, nil)
}

// StartZooKeeperAuth is StartZooKeeper for a server that refuses every
// request from a client that has not authenticated with the digest scheme
// (ZooKeeper's enforce.auth), for testing store credentials.
func StartZooKeeperAuth(t testing.TB, o ServerOptions) *Server {
	t.Helper()
	return startZooKeeper(t, o, []string{
		"enforce.auth.enabled=true",
		"enforce.auth.schemes=digest",
	})
}

func startZooKeeper(t testing.TB, o ServerOptions, extra []string) *Server {
	t.Helper()
	java := LookPath(t, "java")
	for _, jar := range []string{zkJar, slf4jJar} {
		if _, err := os.Stat(jar); err != nil {
			Missing(t, "%s not found (apt-get install zookeeper libslf4j-java)", jar)
		}
	}

	dir := t.TempDir()
	port := FreePort(t)
	addr := net.JoinHostPort(o.Host(), strconv.Itoa(port))
	cfg := []string{
		// A short tick lets tests use session timeouts (store TTLs) down
		// to 400 ms; the maximum is raised to a minute.
		"tickTime=200",
		"minSessionTimeout=400",
		"maxSessionTimeout=60000",
		"dataDir=" + filepath.Join(dir, "data"),
		"clientPort=" + strconv.Itoa(port),
		"clientPortAddress=" + o.Host(),
		"maxClientCnxns=0",
		"admin.enableServer=false",
		"4lw.commands.whitelist=srvr,ruok,stat,mntr",
	}
	cfg = append(cfg, extra...)
	if err := os.WriteFile(filepath.Join(dir, "zoo.cfg"), []byte(strings.Join(cfg, "\n")+"\n"), 0o644); err != nil {
		t.Fatalf("write zoo.cfg: %v", err)
	}

	p := &Process{&kvserver.Process{
		Name: "zookeeper",
		Args: o.Command([]string{java, "-Xmx256m",
			"-cp", zkJar + ":" + slf4jJar,
			"org.apache.zookeeper.server.quorum.QuorumPeerMain", "zoo.cfg"}),
		Dir:     dir,
		Ready:   zkReady(addr, o.NetNS),
		Prepare: zkDropTornLogs(filepath.Join(dir, "data")),
	}}
	p.Start(t)
	t.Cleanup(func() { p.Stop(t) })
	return &Server{Process: p, Scheme: "zk", Addr: addr}
}

// zkDropTornLogs returns a Prepare step for a ZooKeeper server with data
// directory data: it removes transaction logs shorter than their 16-byte
// file header. A server stopped between creating a new log and writing its
// header leaves such a file, holding no transaction, and ZooKeeper 3.8
// then refuses to start (EOFException in FileHeader.deserialize).
func zkDropTornLogs(data string) func() error {
	return func() error {
		logs, err := filepath.Glob(filepath.Join(data, "version-2", "log.*"))
		if err != nil {
			return err
		}
		for _, l := range logs {
			fi, err := os.Stat(l)
			if err != nil {
				return err
			}
			if fi.Size() < 16 {
				if err := os.Remove(l); err != nil {
					return fmt.Errorf("remove torn zookeeper log: %w", err)
				}
			}
		}
		return nil
	}
}

// zkReady asks the server "srvr": it answers with its version only once it
// serves clients ("not currently serving requests" before that).
func zkReady(addr, nsPath string) func() error {
	return func() error {
		c, err := dialIn(nsPath, addr, 500*time.Millisecond)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte("srvr")); err != nil {
			return err
		}
		out, err := io.ReadAll(c)
		if err != nil {
			return err
		}
		if !strings.Contains(string(out), "Zookeeper version") {
			return fmt.Errorf("zookeeper at %s not serving yet: %q", addr, strings.TrimSpace(string(out)))
		}
		return nil
	}
}

// dialIn opens a TCP connection from inside the network namespace at nsPath
// (or from the test's own namespace when nsPath is empty).
func dialIn(nsPath, addr string, timeout time.Duration) (net.Conn, error) {
	if nsPath == "" {
		return net.DialTimeout("tcp", addr, timeout)
	}
	target, err := netns.GetFromPath(nsPath)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", nsPath, err)
	}
	defer target.Close()

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		return nil, fmt.Errorf("current netns: %w", err)
	}
	defer orig.Close()
	if err := netns.Set(target); err != nil {
		return nil, fmt.Errorf("enter netns %s: %w", nsPath, err)
	}
	// The socket stays in target after the thread switches back.
	c, dialErr := net.DialTimeout("tcp", addr, timeout)
	if err := netns.Set(orig); err != nil {
		// This thread is in the wrong namespace: never unlock it, so
		// the runtime drops it instead of reusing it.
		runtime.LockOSThread()
		if c != nil {
			c.Close()
		}
		return nil, fmt.Errorf("return from netns %s: %w", nsPath, err)
	}
	return c, dialErr
}
