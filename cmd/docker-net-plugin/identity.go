package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// DefaultStateDir holds what the plugin keeps on this machine: its machine
// id (and, by default, the embedded store's file). A managed plugin has it
// inside its rootfs, which survives plugin restarts (a plugin remove or
// upgrade starts with a new id, which is harmless: the id only has to tell
// live plugins apart).
const DefaultStateDir = "/var/lib/docker-net-plugin"

// machineIDFile is the name of the machine id file in the state directory.
const machineIDFile = "machine-id"

// machineID returns this machine's identity: a random id made the first
// time and kept in dir, so that it stays the same across plugin restarts
// and differs between machines, even machines with the same hostname or
// the same advertise address.
func machineID(dir string) (string, error) {
	path := filepath.Join(dir, machineIDFile)
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if !validMachineID(id) {
			return "", fmt.Errorf("machine id file %s holds %q, not 32 hex digits: delete it and the plugin makes a new one", path, id)
		}
		return id, nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("read the machine id: %w", err)
	}
	raw := make([]byte, 16)
	rand.Read(raw)
	id := hex.EncodeToString(raw)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("state directory (--state-dir): %w", err)
	}
	// Written under a temporary name and renamed: a crash never leaves a
	// half-written id, and two processes starting at once agree on one.
	tmp, err := os.CreateTemp(dir, machineIDFile+".*")
	if err != nil {
		return "", fmt.Errorf("write the machine id: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(id + "\n"); err != nil {
		tmp.Close()
		return "", fmt.Errorf("write the machine id: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return "", fmt.Errorf("write the machine id: %w", err)
	}
	if err := os.Link(tmp.Name(), path); err != nil {
		if errors.Is(err, os.ErrExist) {
			return machineID(dir) // another process made it first: use theirs
		}
		return "", fmt.Errorf("write the machine id: %w", err)
	}
	return id, nil
}

func validMachineID(id string) bool {
	if len(id) != 32 {
		return false
	}
	_, err := hex.DecodeString(id)
	return err == nil
}
