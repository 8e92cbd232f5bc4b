package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/dnplabs/docker-net-plugin/overlay"
	"github.com/dnplabs/docker-net-plugin/overlay/crypt"
)

// encryptionFlags say where this host's state (identity, key) lives and
// how encrypted overlays run (serve and doctor share them; see
// docs/encryption.md).
type encryptionFlags struct {
	stateDir      string
	port          int
	rekeyInterval time.Duration
	pskFile       string
}

func addEncryptionFlags(fs *flag.FlagSet, e *encryptionFlags) {
	fs.StringVar(&e.stateDir, "state-dir", DefaultStateDir, "directory of what the plugin keeps on this machine: its identity (machine-id), its private key (host-key) and the encryption data path's socket; it must survive restarts, differ between machines and stay private")
	fs.IntVar(&e.port, "encrypt-port", 4797, "UDP port of encrypted overlays' packets between hosts (the same on every host)")
	fs.DurationVar(&e.rekeyInterval, "rekey-interval", time.Hour, "how long an encrypted overlay's traffic key is used (the same on every host; at least 1s)")
	fs.StringVar(&e.pskFile, "psk-file", "", "file with a secret shared by all hosts (at least 16 bytes), mixed into every traffic key: whoever can write the store then still cannot pose as a host")
}

// encryption returns the data path settings and this host's public key,
// creating the host's key pair on first use.
func (e encryptionFlags) encryption(logLevel string) (*overlay.Encryption, string, error) {
	if e.port < 1 || e.port > 65535 || e.port == overlay.VXLANPort {
		return nil, "", fmt.Errorf("--encrypt-port %d: want 1..65535, not %d", e.port, overlay.VXLANPort)
	}
	if e.rekeyInterval < time.Second {
		return nil, "", fmt.Errorf("--rekey-interval %s: want at least 1s", e.rekeyInterval)
	}
	if _, err := crypt.LoadPSK(e.pskFile); err != nil {
		return nil, "", err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, "", fmt.Errorf("encryption: find this program: %w", err)
	}
	keyFile := filepath.Join(e.stateDir, "host-key")
	k, err := crypt.LoadOrCreateKey(keyFile)
	if err != nil {
		return nil, "", err
	}
	enc := &overlay.Encryption{
		Command: []string{exe, "crypt"}, StateDir: e.stateDir, KeyFile: keyFile, PSKFile: e.pskFile,
		Port: e.port, RekeyInterval: e.rekeyInterval, LogLevel: logLevel,
	}
	return enc, crypt.EncodePublic(k.PublicKey()), nil
}

// runCrypt is the encryption data path the plugin starts (crypt command).
func runCrypt(ctx context.Context, args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("crypt takes no arguments (its settings come from $%s, set by the plugin)", crypt.ConfigEnv)
	}
	return crypt.RunFromEnv(ctx)
}
