// Command docker-net-plugin is a Docker network plugin for multi-host
// overlays: a libnetwork remote NetworkDriver and IpamDriver on one unix
// socket, with state in a KV store (bolt, etcd, Consul or ZooKeeper).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/store"
	"github.com/dnplabs/docker-net-plugin/store/stores"
)

const usage = `usage: docker-net-plugin <command> [flags]

commands:
  serve    run the plugin (legacy socket or managed plugin)
  status   show the cluster as the store records it: hosts, overlays, endpoints
  doctor   compare this host's kernel with the store; --fix repairs it
  crypt    the encryption data path (the plugin starts it; not for direct use)
  version  print the version

Run "docker-net-plugin <command> -h" for a command's flags. Every flag can
also be set from the environment variable named in its help.
`

var version = "dev"

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(ctx, os.Args[2:])
	case "status":
		err = status(ctx, os.Stdout, os.Args[2:])
	case "doctor":
		err = doctor(ctx, os.Stdout, os.Args[2:])
	case "crypt":
		err = runCrypt(ctx, os.Args[2:])
	case "version":
		fmt.Println(version)
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if errors.Is(err, errProblems) {
		os.Exit(1) // doctor has printed them
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "docker-net-plugin:", err)
		os.Exit(1)
	}
}

// addStoreFlags defines the flags that say which store to use and how to
// log in to it (serve, status and doctor share them). Secrets (the Consul
// token, the password) never come from a flag, whose value every user of
// the machine can read in the process list: they come from a file named
// by a flag, or from the environment (DNP_STORE_TOKEN, CONSUL_HTTP_TOKEN,
// DNP_STORE_PASSWORD).
func addStoreFlags(fs *flag.FlagSet, c *store.Config) {
	fs.StringVar(&c.URL, "store", store.DefaultURL, "store URL: bolt:///path, etcd://h:2379[,h2:2379]/prefix, consul://h:8500/prefix, zk://h:2181/prefix")
	fs.StringVar(&c.CAFile, "store-ca", "", "CA certificate file for the store (etcd, Consul)")
	fs.StringVar(&c.CertFile, "store-cert", "", "client certificate file for the store (etcd, Consul)")
	fs.StringVar(&c.KeyFile, "store-key", "", "client key file for the store (etcd, Consul)")
	fs.Func("store-token-file", "file holding the Consul ACL token (or set DNP_STORE_TOKEN or CONSUL_HTTP_TOKEN)", secretFile(&c.Token))
	fs.StringVar(&c.Username, "store-username", "", "user for etcd auth or ZooKeeper digest auth")
	fs.Func("store-password-file", "file holding the password for etcd auth or ZooKeeper digest auth (or set DNP_STORE_PASSWORD)", secretFile(&c.Password))
}

// secretFile reads a secret from the file a flag names into dst; a final
// line break is not part of it.
func secretFile(dst *string) func(string) error {
	return func(path string) error {
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		*dst = strings.TrimRight(string(b), "\r\n")
		if *dst == "" {
			return fmt.Errorf("%s is empty", path)
		}
		return nil
	}
}

// hostFlags say who this host is and where its overlay namespaces live
// (serve and doctor share them).
type hostFlags struct {
	advertise, netnsPrefix, netnsDir string
	encryption                       encryptionFlags
}

func addHostFlags(fs *flag.FlagSet, h *hostFlags) {
	fs.StringVar(&h.advertise, "advertise-addr", "", "this host's underlay address (default: the address of the interface with the default route)")
	fs.StringVar(&h.netnsPrefix, "netns-prefix", "dnp-", "names of the per-overlay network namespaces (/run/netns/<prefix><vni>); set it per host when several hosts share one machine")
	fs.StringVar(&h.netnsDir, "netns-dir", overlay.DefaultDir, "directory the per-overlay network namespaces are bound in")
	addEncryptionFlags(fs, &h.encryption)
}

// openStore opens the store, bounded by a deadline.
func openStore(ctx context.Context, c store.Config) (store.Store, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := stores.Open(ctx, c.FromEnv())
	if err != nil {
		return nil, fmt.Errorf("open store: %w", err)
	}
	return st, nil
}

// envFlags makes every flag of fs default to the environment variable
// DNP_<NAME> (dashes become underscores) when that variable is set.
func envFlags(fs *flag.FlagSet) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		name := envName(f.Name)
		f.Usage += " (env " + name + ")"
		if v, ok := os.LookupEnv(name); ok && v != "" && err == nil {
			if e := f.Value.Set(v); e != nil {
				err = fmt.Errorf("environment %s=%q: %w", name, v, e)
			}
		}
	})
	return err
}

func envName(flagName string) string {
	return "DNP_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// newLogger builds the slog logger from --log-level and --log-format.
func newLogger(w io.Writer, level, format string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log format %q: want text or json", format)
}
