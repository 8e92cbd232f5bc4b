package integration

import (
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/dnplabs/docker-net-plugin/integration/harness"
)

// TestDoctorFixDuringJoins: `doctor --fix` runs in a loop while containers
// start and stop on three overlays of the host. Whatever the doctor reads
// while a Join builds an overlay or an endpoint, no container loses its
// interface: each one starts, has its address on eth0 and reaches its
// neighbour.
func TestDoctorFixDuringJoins(t *testing.T) {
	c := harness.New(t, 1, harness.Options{})
	url, _ := kvServer(t, c, "etcd")
	relRemoveContainersFirst(t, c)
	h := c.Hosts[0]
	startPlugin(t, c, h, url)
	nets := []string{"dr1", "dr2", "dr3"}
	for i, n := range nets {
		h.MustDocker(t, "network", "create", "-d", pluginName, "--ipam-driver", pluginName,
			"--subnet", fmt.Sprintf("10.80.%d.0/24", i), "-o", "overlay="+n, n)
	}

	bin := harness.PluginBinary(t)
	stop := make(chan struct{})
	var runs, fixes atomic.Int32
	var removedMu sync.Mutex
	var removed []string
	doctorDone := make(chan struct{})
	go func() {
		defer close(doctorDone)
		for {
			select {
			case <-stop:
				return
			default:
			}
			out, _ := h.Command(bin, "doctor", "--fix", "--store", url, "--advertise-addr", h.UnderlayIP,
				"--netns-prefix", c.Prefix+"-"+h.Name+"-").CombinedOutput()
			runs.Add(1)
			time.Sleep(20 * time.Millisecond) // leave the (2-core) machine to dockerd now and then
			for _, l := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(l, "removed") {
					removedMu.Lock()
					removed = append(removed, l)
					removedMu.Unlock()
				}
				if strings.HasPrefix(l, "fixing:") {
					fixes.Add(1)
				}
			}
		}
	}()
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		<-doctorDone
	}()

	const rounds = 4
	lostIface := 0
	var failedRuns atomic.Int32
	for r := range rounds {
		start := time.Now()
		// Two containers per overlay, all at once: the first Join on an
		// overlay builds its namespace, the others add ports to it.
		type ctr struct{ name, net, ip string }
		var ctrs []ctr
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, n := range nets {
			for k := range 2 {
				name := fmt.Sprintf("%s-r%d-%d", n, r, k)
				wg.Add(1)
				go func() {
					defer wg.Done()
					_, err := h.Docker("run", "-d", "--init", "--name", name, "--network", n, harness.Image, "sleep", "3600")
					if err != nil {
						failedRuns.Add(1)
						t.Errorf("round %d: %v", r, err)
						return
					}
					ip, err := h.Docker("inspect", "-f", "{{(index .NetworkSettings.Networks \""+n+"\").IPAddress}}", name)
					if err != nil {
						t.Errorf("round %d: %v", r, err)
						return
					}
					mu.Lock()
					ctrs = append(ctrs, ctr{name, n, ip})
					mu.Unlock()
				}()
			}
		}
		wg.Wait()
		time.Sleep(300 * time.Millisecond) // let a doctor run or two see them all
		for _, x := range ctrs {
			out, err := h.Docker("exec", x.name, "ip", "addr", "show", "dev", "eth0")
			if err != nil || !strings.Contains(out, x.ip+"/") {
				lostIface++
				t.Errorf("round %d: container %s (%s on %s) lost its interface: %s %v", r, x.name, x.ip, x.net, out, err)
				continue
			}
			for _, y := range ctrs {
				if y.net == x.net && y.name > x.name { // one way per pair
					if ok, out := ping(h, x.name, y.ip); !ok {
						t.Errorf("round %d: %s cannot reach %s (%s): %s", r, x.name, y.name, y.ip, out)
					}
				}
			}
		}
		if ids := h.MustDocker(t, "ps", "-aq"); ids != "" {
			h.MustDocker(t, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
		t.Logf("round %d took %s", r, time.Since(start).Round(time.Millisecond))
	}
	close(stop)
	<-doctorDone
	removedMu.Lock()
	defer removedMu.Unlock()
	t.Logf("%d rounds of 6 containers; doctor --fix ran %d times (%d with something to fix); containers that failed to start: %d, lost their interface: %d",
		rounds, runs.Load(), fixes.Load(), failedRuns.Load(), lostIface)
	if len(removed) > 0 {
		t.Logf("what doctor --fix removed:\n%s", strings.Join(removed, "\n"))
	}
	if runs.Load() < 10 {
		t.Errorf("doctor --fix ran only %d times alongside the containers: the test proves little", runs.Load())
	}
}
