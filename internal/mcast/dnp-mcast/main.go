// Command dnp-mcast sends or receives numbered multicast UDP datagrams; the
// integration tests and benchmarks build it into the test image.
//
//	dnp-mcast send [-i IFACE] [-n 2000] [-rate 200] [-size 64] [-run ID] GROUP:PORT
//	dnp-mcast recv [-i IFACE] [-n 2000] [-timeout 30s] [-idle 2s] [-run ID] [-ready FILE] GROUP:PORT
//
// recv prints a JSON result on stdout (see mcast.Result); it creates the
// -ready file once it has joined the group. send prints how many it sent.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/dnplabs/docker-net-plugin/internal/mcast"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "dnp-mcast:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) == 0 {
		return errors.New("usage: dnp-mcast send|recv [flags] GROUP:PORT")
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	iface := fs.String("i", "", "interface (default: the kernel routes the group)")
	count := fs.Int("n", 2000, "datagrams to send, or to wait for (0: until -timeout/-idle)")
	runID := fs.Uint64("run", 1, "run id (recv: 0 accepts any)")
	switch args[0] {
	case "send":
		rate := fs.Float64("rate", 200, "datagrams per second")
		size := fs.Int("size", 64, "UDP payload bytes")
		ttl := fs.Int("ttl", 1, "TTL / hop limit")
		group, err := parse(fs, args[1:])
		if err != nil {
			return err
		}
		n, err := mcast.Send(ctx, mcast.SendConfig{Group: group, Iface: *iface, Count: *count, Rate: *rate, Size: *size, TTL: *ttl, Run: *runID})
		fmt.Printf("{\"sent\":%d}\n", n)
		return err
	case "recv":
		timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
		idle := fs.Duration("idle", 0, "stop this long after the last datagram (0: never)")
		ready := fs.String("ready", "", "create this file once joined")
		group, err := parse(fs, args[1:])
		if err != nil {
			return err
		}
		cfg := mcast.RecvConfig{Group: group, Iface: *iface, Expect: *count, Timeout: *timeout, Idle: *idle, Run: *runID}
		conn, ifName, err := mcast.Join(cfg)
		if err != nil {
			return err
		}
		defer conn.Close()
		if *ready != "" {
			if err := os.WriteFile(*ready, []byte(ifName+"\n"), 0o644); err != nil {
				return err
			}
		}
		res, err := mcast.Receive(ctx, conn, cfg)
		res.Iface = ifName
		out, _ := json.Marshal(res)
		fmt.Println(string(out))
		return err
	default:
		return fmt.Errorf("unknown mode %q: want send or recv", args[0])
	}
}

func parse(fs *flag.FlagSet, args []string) (netip.AddrPort, error) {
	if err := fs.Parse(args); err != nil {
		return netip.AddrPort{}, err
	}
	if fs.NArg() != 1 {
		return netip.AddrPort{}, errors.New("want one GROUP:PORT argument (IPv6: [GROUP]:PORT)")
	}
	g, err := netip.ParseAddrPort(fs.Arg(0))
	if err != nil {
		return g, fmt.Errorf("group %q: %v", fs.Arg(0), err)
	}
	return g, nil
}
