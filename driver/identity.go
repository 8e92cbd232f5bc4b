package driver

import (
	"encoding/json"
	"fmt"
	"sync"
)

// Machine identity. Every record of a host is keyed by its advertise
// address, so two machines with one address (NAT'ed VMs that all default to
// the same default-route address) would silently share one identity. The
// live key hosts/<addr> therefore names the machine that holds it (a random
// id the plugin keeps in its state directory), and a plugin takes that key
// over only from a previous run of its own machine. A plugin whose address
// is held by another machine refuses to work until it is restarted.

// IdentityConflict: another machine holds this host's advertise address.
type IdentityConflict struct {
	Addr   string     // the advertise address both claim
	Holder hostRecord // the machine that holds it
	Self   hostRecord // this machine
}

func (e *IdentityConflict) Error() string {
	return fmt.Sprintf("advertise address %s is already used by another machine: %s (machine id %s, its plugin up since %s); "+
		"this machine is %s (machine id %s). Each machine needs an address of its own that the other hosts reach it at: "+
		"set --advertise-addr (DNP_ADVERTISE_ADDR) and restart the plugin. If this machine is a clone of the other one, "+
		"delete the file machine-id in the plugin's state directory (--state-dir) and restart the plugin",
		e.Addr, orUnknown(e.Holder.Name), orUnknown(e.Holder.ID), orUnknown(e.Holder.Started),
		orUnknown(e.Self.Name), orUnknown(e.Self.ID))
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// mayTakeOver lets this host's registration replace a live key of its
// own machine (a previous run whose liveness has not run out yet), or of
// a plugin too old to record a machine id, and refuses any other.
func mayTakeOver(self hostRecord) func(current []byte) error {
	return func(current []byte) error {
		var holder hostRecord
		if json.Unmarshal(current, &holder) != nil {
			return nil // not a record of ours at all: overwrite it
		}
		if holder.ID == "" || holder.ID == self.ID {
			return nil
		}
		return &IdentityConflict{Addr: self.Addr, Holder: holder, Self: self}
	}
}

// identity is whether this host's registration is confirmed ours.
type identity struct {
	mu         sync.Mutex
	registered bool  // the live key was written under this machine's id
	refused    error // another machine holds the address: an *IdentityConflict
}

func (id *identity) setRegistered() {
	id.mu.Lock()
	defer id.mu.Unlock()
	id.registered = true
}

// refuse puts the driver out of service for good (until a restart).
func (id *identity) refuse(err error) {
	id.mu.Lock()
	defer id.mu.Unlock()
	if id.refused == nil {
		id.refused = err
	}
}

// ours says whether the host's records may be acted on: the live key was
// written by this machine and no other machine took the address over.
func (id *identity) ours() bool {
	id.mu.Lock()
	defer id.mu.Unlock()
	return id.registered && id.refused == nil
}

// Refused returns why the driver refuses to work (another machine holds
// this host's advertise address: an *IdentityConflict), or nil. The plugin
// then answers every call with this error.
func (d *Driver) Refused() error {
	d.id.mu.Lock()
	defer d.id.mu.Unlock()
	return d.id.refused
}

// checkOwnKey puts the driver out of service when this host's live key
// names another machine: while this plugin was cut off from the store for
// longer than the liveness TTL, another machine registered its address.
func (p *peerSync) checkOwnKey(value []byte) {
	if p.machineID == "" || !p.id.ours() {
		return
	}
	var holder hostRecord
	if json.Unmarshal(value, &holder) != nil || holder.ID == "" || holder.ID == p.machineID {
		return
	}
	self := hostRecord{Addr: p.host, ID: p.machineID, Name: hostname()}
	err := &IdentityConflict{Addr: p.host, Holder: holder, Self: self}
	p.id.refuse(fmt.Errorf("the plugin refuses to work: %w", err))
	p.log.Error("this plugin refuses to work: another machine took over this host's advertise address while this plugin was cut off from the store", "err", err)
}
