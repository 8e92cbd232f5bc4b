// Package crypt is the encrypting data path of encrypted overlays: the
// keys, the wire format, and the process that carries an encrypted
// overlay's VXLAN packets between hosts.
//
// The kernel keeps doing VXLAN (FDB, flooding, ARP/ND suppression), but
// the VXLAN sockets of encrypted overlays live in a namespace of their own
// whose only way out is a TUN device. The data path reads each VXLAN
// packet from the TUN, seals its VXLAN header and frame with AES-256-GCM
// under a key for that pair of hosts, direction and epoch, and sends it in
// a UDP datagram to the remote host's data path, which opens it, checks
// it, and writes the VXLAN packet back into its own TUN. Nothing else
// connects that namespace to the underlay, so no cleartext VXLAN of an
// encrypted overlay can leave a host, whatever state the data path is in.
//
// Keys: every host has an X25519 key pair; the private key stays on the
// host (a file only root can read) and the public key is published in the
// store. The traffic key from host A to host B is
//
//	HKDF-SHA256(secret = X25519(a, B) || psk, salt = "dnp encrypt v1",
//	            info = "traffic" || A || B || pubA || pubB || epoch || key id)
//
// where psk is an optional pre-shared secret every host has, epoch is
// the wall-clock time divided by the rekey interval, and key id is a
// random number the sender picks for every key it starts using (so a
// restarted sender never reuses a key and its GCM nonces). Receivers
// accept the current epoch and its two neighbours, so a new epoch's keys
// are accepted before any sender uses them and the old ones stay valid
// for one more interval: rekeying needs no messages, and a host that was
// down is in step the moment it is back.
package crypt

import (
	"bytes"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// KeySize is the size of X25519 keys and of the AES-256 traffic keys.
const KeySize = 32

// MinPSKSize is the shortest pre-shared secret accepted.
const MinPSKSize = 16

// salt is the HKDF salt of every derivation: it names the protocol version.
var salt = []byte("dnp encrypt v1")

// LoadOrCreateKey reads the host's private key from path, creating it
// (and its directory, mode 0700) with a new random key if there is none.
// The file holds the key in base64 and is made readable by its owner only.
// Two processes calling it at once end up with the same key.
func LoadOrCreateKey(path string) (*ecdh.PrivateKey, error) {
	if k, err := readKey(path); err == nil || !errors.Is(err, os.ErrNotExist) {
		return k, err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("host key: create %s: %w", dir, err)
	}
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("host key: generate: %w", err)
	}
	tmp, err := os.CreateTemp(dir, ".host-key-*")
	if err != nil {
		return nil, fmt.Errorf("host key: %w", err)
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return nil, fmt.Errorf("host key: %w", err)
	}
	_, err = tmp.WriteString(base64.StdEncoding.EncodeToString(k.Bytes()) + "\n")
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("host key: write %s: %w", tmp.Name(), err)
	}
	// A hard link fails if the file appeared meanwhile: then use that one.
	if err := os.Link(tmp.Name(), path); err != nil && !errors.Is(err, os.ErrExist) {
		return nil, fmt.Errorf("host key: %w", err)
	}
	return readKey(path)
}

func readKey(path string) (*ecdh.PrivateKey, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("host key: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("host key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := f.Chmod(0o600); err != nil {
			return nil, fmt.Errorf("host key %s is readable by others and cannot be fixed: %w", path, err)
		}
	}
	b := make([]byte, 256)
	n, err := f.Read(b)
	if err != nil {
		return nil, fmt.Errorf("host key: read %s: %w", path, err)
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b[:n])))
	if err != nil || len(raw) != KeySize {
		return nil, fmt.Errorf("host key %s: not a base64 X25519 private key", path)
	}
	k, err := ecdh.X25519().NewPrivateKey(raw)
	if err != nil {
		return nil, fmt.Errorf("host key %s: %w", path, err)
	}
	return k, nil
}

// EncodePublic is the text form of a public key, as published in the store.
func EncodePublic(k *ecdh.PublicKey) string { return base64.StdEncoding.EncodeToString(k.Bytes()) }

// ParsePublic reads EncodePublic's form.
func ParsePublic(s string) (*ecdh.PublicKey, error) {
	raw, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(raw) != KeySize {
		return nil, fmt.Errorf("public key %q: want %d bytes in base64", s, KeySize)
	}
	k, err := ecdh.X25519().NewPublicKey(raw)
	if err != nil {
		return nil, fmt.Errorf("public key %q: %w", s, err)
	}
	return k, nil
}

// LoadPSK reads a pre-shared secret file: its bytes, surrounding white
// space removed, at least MinPSKSize of them. An empty path means none.
func LoadPSK(path string) ([]byte, error) {
	if path == "" {
		return nil, nil
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("pre-shared secret: %w", err)
	}
	b = bytes.TrimSpace(b)
	if len(b) < MinPSKSize {
		return nil, fmt.Errorf("pre-shared secret %s: %d bytes; want at least %d (e.g. head -c 32 /dev/urandom | base64 > %s)", path, len(b), MinPSKSize, path)
	}
	return b, nil
}

// PSKID is a short identifier of a pre-shared secret ("" for none), for
// telling whether a running data path has the secret a file now holds.
// It is shown only on the data path's root-only control socket.
func PSKID(psk []byte) string {
	if psk == nil {
		return ""
	}
	h := sha256.Sum256(append([]byte("dnp psk id "), psk...))
	return base64.RawStdEncoding.EncodeToString(h[:9])
}

// Pair is the secret shared by this host and one remote host: everything
// the traffic keys of the pair are derived from.
type Pair struct {
	local, remote       netip.Addr
	localPub, remotePub []byte
	prk                 []byte // HKDF pseudorandom key of the pair
}

// NewPair computes the pair secret of this host (local address and private
// key) and a remote host (address and public key), mixed with psk if any.
func NewPair(local netip.Addr, priv *ecdh.PrivateKey, remote netip.Addr, remotePub *ecdh.PublicKey, psk []byte) (*Pair, error) {
	shared, err := priv.ECDH(remotePub)
	if err != nil {
		return nil, fmt.Errorf("key agreement with %s: %w", remote, err)
	}
	prk, err := hkdf.Extract(sha256.New, append(shared, psk...), salt)
	if err != nil {
		return nil, err
	}
	return &Pair{
		local: local.Unmap(), remote: remote.Unmap(),
		localPub: priv.PublicKey().Bytes(), remotePub: remotePub.Bytes(), prk: prk,
	}, nil
}

// SendKey is the traffic key from this host to the remote one.
func (p *Pair) SendKey(epoch uint32, id uint64) []byte {
	return p.key(p.local, p.remote, p.localPub, p.remotePub, epoch, id)
}

// ReceiveKey is the traffic key from the remote host to this one.
func (p *Pair) ReceiveKey(epoch uint32, id uint64) []byte {
	return p.key(p.remote, p.local, p.remotePub, p.localPub, epoch, id)
}

func (p *Pair) key(from, to netip.Addr, fromPub, toPub []byte, epoch uint32, id uint64) []byte {
	var info bytes.Buffer
	info.WriteString("traffic")
	f, t := from.As16(), to.As16()
	info.Write(f[:])
	info.Write(t[:])
	info.Write(fromPub)
	info.Write(toPub)
	binary.Write(&info, binary.BigEndian, epoch)
	binary.Write(&info, binary.BigEndian, id)
	k, err := hkdf.Expand(sha256.New, p.prk, info.String(), KeySize)
	if err != nil {
		panic(err) // only for lengths SHA-256 HKDF cannot give
	}
	return k
}

// Epoch is the rekey epoch of time t: t divided by the rekey interval.
func Epoch(t time.Time, interval time.Duration) uint32 {
	return uint32(t.UnixNano() / int64(interval))
}

// acceptable says whether a packet of epoch e may be opened in epoch now:
// the one before (its keys stay valid one more interval), now, and the one
// after (a sender whose clock is a little ahead already uses it).
func acceptable(e, now uint32) bool {
	return e == now || e+1 == now || e == now+1
}
