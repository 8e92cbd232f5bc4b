package crypt

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

var (
	addrA = netip.MustParseAddr("192.0.2.1")
	addrB = netip.MustParseAddr("192.0.2.2")
	addrC = netip.MustParseAddr("192.0.2.3")
)

func genKey(t *testing.T) *ecdh.PrivateKey {
	t.Helper()
	k, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// pairs returns the pair as A sees it (A -> B) and as B sees it.
func pairs(t *testing.T, a, b *ecdh.PrivateKey, pskA, pskB []byte) (*Pair, *Pair) {
	t.Helper()
	ab, err := NewPair(addrA, a, addrB, b.PublicKey(), pskA)
	if err != nil {
		t.Fatal(err)
	}
	ba, err := NewPair(addrB, b, addrA, a.PublicKey(), pskB)
	if err != nil {
		t.Fatal(err)
	}
	return ab, ba
}

func TestPairKeysAgreeAndDiffer(t *testing.T) {
	a, b, c := genKey(t), genKey(t), genKey(t)
	ab, ba := pairs(t, a, b, nil, nil)

	// Both hosts derive the same key for each direction.
	if !bytes.Equal(ab.SendKey(7, 1), ba.ReceiveKey(7, 1)) {
		t.Fatal("A's key to B differs from the key B expects from A")
	}
	if !bytes.Equal(ba.SendKey(7, 1), ab.ReceiveKey(7, 1)) {
		t.Fatal("B's key to A differs from the key A expects from B")
	}
	// Every input matters: direction, epoch, key id, the pair, the PSK.
	distinct := map[string][]byte{
		"A->B e7 id1": ab.SendKey(7, 1),
		"B->A e7 id1": ab.ReceiveKey(7, 1),
		"A->B e8 id1": ab.SendKey(8, 1),
		"A->B e7 id2": ab.SendKey(7, 2),
	}
	ac, err := NewPair(addrA, a, addrC, c.PublicKey(), nil)
	if err != nil {
		t.Fatal(err)
	}
	distinct["A->C e7 id1"] = ac.SendKey(7, 1)
	abPSK, _ := pairs(t, a, b, []byte("0123456789abcdef"), nil)
	distinct["A->B e7 id1 psk"] = abPSK.SendKey(7, 1)
	// The same keys, but B claims another address: another key.
	abOther, err := NewPair(addrA, a, addrC, b.PublicKey(), nil)
	if err != nil {
		t.Fatal(err)
	}
	distinct["A->B-at-C e7 id1"] = abOther.SendKey(7, 1)
	seen := map[string]string{}
	for name, k := range distinct {
		if len(k) != KeySize {
			t.Fatalf("%s: key of %d bytes", name, len(k))
		}
		if other, ok := seen[string(k)]; ok {
			t.Errorf("%s and %s have the same key", name, other)
		}
		seen[string(k)] = name
	}
}

// A store writer who replaces B's public key with one of its own can talk
// to A as B unless the hosts share a PSK it does not know.
func TestPSKStopsStoreWriter(t *testing.T) {
	a, b, m := genKey(t), genKey(t), genKey(t)
	psk := []byte("a secret all hosts have, not in the store")

	// Without a PSK, A (believing m's public key is B's) and the attacker
	// (knowing m and A's public key) agree on the keys: the attack works.
	aToFake, err := NewPair(addrA, a, addrB, m.PublicKey(), nil)
	if err != nil {
		t.Fatal(err)
	}
	attacker, err := NewPair(addrB, m, addrA, a.PublicKey(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(aToFake.ReceiveKey(1, 1), attacker.SendKey(1, 1)) {
		t.Fatal("without a PSK the substituted key should work (that is the threat the PSK addresses)")
	}
	// With a PSK on the hosts, the attacker's keys are wrong.
	aToFake, _ = NewPair(addrA, a, addrB, m.PublicKey(), psk)
	if bytes.Equal(aToFake.ReceiveKey(1, 1), attacker.SendKey(1, 1)) {
		t.Fatal("with a PSK the attacker still derived A's receive key")
	}
	// And the real B, with the PSK, still agrees with A.
	ab, ba := pairs(t, a, b, psk, psk)
	if !bytes.Equal(ab.SendKey(1, 1), ba.ReceiveKey(1, 1)) {
		t.Fatal("A and B with the same PSK disagree")
	}
}

func TestEpoch(t *testing.T) {
	base := time.Unix(1_700_000_000, 0)
	if e1, e2 := Epoch(base, time.Hour), Epoch(base.Add(59*time.Minute), time.Hour); e1 != e2 && e2 != e1+1 {
		t.Fatalf("epochs %d, %d an hour apart", e1, e2)
	}
	if Epoch(base.Add(time.Hour), time.Hour) != Epoch(base, time.Hour)+1 {
		t.Fatal("an hour later is not the next epoch")
	}
	for _, c := range []struct {
		e, now uint32
		ok     bool
	}{{5, 5, true}, {4, 5, true}, {6, 5, true}, {3, 5, false}, {7, 5, false}, {0, 0, true}, {1<<32 - 1, 0, true}, {1<<32 - 1, 2, false}} {
		if got := acceptable(c.e, c.now); got != c.ok {
			t.Errorf("acceptable(%d, %d) = %v, want %v", c.e, c.now, got, c.ok)
		}
	}
}

func TestLoadOrCreateKey(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state", "host-key")
	// Several processes (here goroutines) starting at once agree.
	keys := make([]*ecdh.PrivateKey, 8)
	var wg sync.WaitGroup
	for i := range keys {
		wg.Go(func() {
			k, err := LoadOrCreateKey(path)
			if err != nil {
				t.Error(err)
			}
			keys[i] = k
		})
	}
	wg.Wait()
	for _, k := range keys[1:] {
		if k == nil || !k.Equal(keys[0]) {
			t.Fatal("concurrent LoadOrCreateKey returned different keys")
		}
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
	}
	di, _ := os.Stat(filepath.Dir(path))
	if di.Mode().Perm() != 0o700 {
		t.Errorf("key directory mode %v, want 0700", di.Mode().Perm())
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".host-key-*")); len(left) > 0 {
		t.Errorf("temporary files left: %v", left)
	}
	// Loaded again (a restart): the same key; a too open file is fixed.
	os.Chmod(path, 0o644)
	k, err := LoadOrCreateKey(path)
	if err != nil || !k.Equal(keys[0]) {
		t.Fatalf("reload: %v", err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v after reload, want 0600", fi.Mode().Perm())
	}
	// A damaged file is an error, not a silent new key.
	os.WriteFile(path, []byte("not a key\n"), 0o600)
	if _, err := LoadOrCreateKey(path); err == nil {
		t.Error("a damaged key file was accepted")
	}
}

func TestPublicKeyText(t *testing.T) {
	k := genKey(t)
	s := EncodePublic(k.PublicKey())
	p, err := ParsePublic(s)
	if err != nil || !p.Equal(k.PublicKey()) {
		t.Fatalf("round trip of %q: %v", s, err)
	}
	for _, bad := range []string{"", "abc", "AAAA", s + "AA"} {
		if _, err := ParsePublic(bad); err == nil {
			t.Errorf("ParsePublic(%q) accepted", bad)
		}
	}
}

func TestLoadPSK(t *testing.T) {
	dir := t.TempDir()
	if b, err := LoadPSK(""); b != nil || err != nil {
		t.Fatalf("no file: %q, %v", b, err)
	}
	short := filepath.Join(dir, "short")
	os.WriteFile(short, []byte("tooshort\n"), 0o600)
	if _, err := LoadPSK(short); err == nil {
		t.Error("a short PSK was accepted")
	}
	good := filepath.Join(dir, "good")
	os.WriteFile(good, []byte("  0123456789abcdefXYZ\n"), 0o600)
	if b, err := LoadPSK(good); err != nil || string(b) != "0123456789abcdefXYZ" {
		t.Errorf("LoadPSK = %q, %v", b, err)
	}
	if _, err := LoadPSK(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
}
