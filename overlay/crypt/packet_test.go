package crypt

import (
	"bytes"
	"crypto/ecdh"
	"crypto/rand"
	"errors"
	"testing"
)

// seal makes a packet of payload from s in epoch e.
func seal(s *Sender, payload []byte, e uint32) []byte {
	buf := make([]byte, HeaderSize+len(payload)+TagSize)
	copy(buf[HeaderSize:], payload)
	return s.Seal(buf, len(payload), e)
}

func TestSealOpen(t *testing.T) {
	a, b := genKey(t), genKey(t)
	ab, ba := pairs(t, a, b, nil, nil)
	s, r := NewSender(ab), NewReceiver(ba)
	payload := bytes.Repeat([]byte{0xa5}, 1400)

	p := seal(s, payload, 100)
	if len(p) != len(payload)+Overhead {
		t.Fatalf("packet of %d bytes, want %d", len(p), len(payload)+Overhead)
	}
	if bytes.Contains(p, bytes.Repeat([]byte{0xa5}, 16)) {
		t.Fatal("the payload is visible in the sealed packet")
	}
	got, err := r.Open(append([]byte(nil), p...), 100)
	if err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("Open: %v", err)
	}
	// The same packet again is a replay.
	if _, err := r.Open(append([]byte(nil), p...), 100); !errors.Is(err, ErrReplay) {
		t.Fatalf("replay: %v, want ErrReplay", err)
	}
	// Any flipped bit, in header or body, fails.
	for _, i := range []int{4, 9, 17, HeaderSize + 3, len(p) - 1} {
		q := seal(s, payload, 100)
		q[i] ^= 0x01
		if _, err := r.Open(q, 100); err == nil {
			t.Errorf("packet with byte %d flipped was accepted", i)
		}
	}
	// Only the real receiver opens it: not A itself, not a third host.
	c := genKey(t)
	cb, _ := NewPair(addrC, c, addrB, b.PublicKey(), nil)
	if _, err := NewReceiver(ab).Open(seal(s, payload, 100), 100); !errors.Is(err, ErrAuth) {
		t.Errorf("A opened its own packet to B: %v", err)
	}
	if _, err := NewReceiver(cb).Open(seal(s, payload, 100), 100); !errors.Is(err, ErrAuth) {
		t.Errorf("a third host opened A's packet to B: %v", err)
	}
	for _, bad := range [][]byte{nil, make([]byte, 10), append([]byte{2}, make([]byte, 60)...)} {
		if _, err := r.Open(bad, 100); !errors.Is(err, ErrMalformed) {
			t.Errorf("Open(%d bytes, version %v): %v, want ErrMalformed", len(bad), bad, err)
		}
	}
}

// Rekeying: a sender moving to the next epoch is understood at once; the
// receiver accepts the epoch before and after its own (clock skew,
// packets in flight) but no further.
func TestRekeyEpochs(t *testing.T) {
	a, b := genKey(t), genKey(t)
	ab, ba := pairs(t, a, b, nil, nil)
	s := NewSender(ab)
	var started []uint32
	r := NewReceiver(ba)
	r.NewKey = func(e uint32, _ uint64) { started = append(started, e) }
	payload := []byte("vxlan header and frame")

	var ids []uint64
	for e := uint32(10); e < 15; e++ {
		for range 3 {
			if _, err := r.Open(seal(s, payload, e), e); err != nil {
				t.Fatalf("epoch %d: %v", e, err)
			}
		}
		_, id := s.KeyInUse()
		ids = append(ids, id)
	}
	if len(started) != 5 {
		t.Errorf("receiver started %d keys over 5 epochs: %v", len(started), started)
	}
	for i := range ids {
		for j := range i {
			if ids[i] == ids[j] {
				t.Errorf("epochs %d and %d used the same key id", i, j)
			}
		}
	}
	// Sender ahead by one epoch, behind by one: accepted. By two: not.
	if _, err := r.Open(seal(NewSender(ab), payload, 21), 20); err != nil {
		t.Errorf("sender one epoch ahead: %v", err)
	}
	if _, err := r.Open(seal(NewSender(ab), payload, 19), 20); err != nil {
		t.Errorf("sender one epoch behind: %v", err)
	}
	for _, e := range []uint32{18, 22} {
		if _, err := r.Open(seal(NewSender(ab), payload, e), 20); !errors.Is(err, ErrEpoch) {
			t.Errorf("sender at epoch %d, receiver at 20: %v, want ErrEpoch", e, err)
		}
	}
}

// A restarted sender (a new Sender for the same pair, counters from 1
// again) uses a new key, so its packets are neither replays nor a reuse
// of a GCM nonce under the old key.
func TestRestartedSenderNewKey(t *testing.T) {
	a, b := genKey(t), genKey(t)
	ab, ba := pairs(t, a, b, nil, nil)
	r := NewReceiver(ba)
	s1 := NewSender(ab)
	p1 := seal(s1, []byte("first"), 5)
	s2 := NewSender(ab)
	p2 := seal(s2, []byte("after restart"), 5)
	if bytes.Equal(p1[16:24], p2[16:24]) && bytes.Equal(p1[8:16], p2[8:16]) {
		t.Fatal("restarted sender reused key id and counter")
	}
	for _, p := range [][]byte{p1, p2} {
		if _, err := r.Open(p, 5); err != nil {
			t.Fatalf("Open: %v", err)
		}
	}
}

func TestReceiverKeyCacheBounded(t *testing.T) {
	a, b := genKey(t), genKey(t)
	ab, ba := pairs(t, a, b, nil, nil)
	r := NewReceiver(ba)
	for i := range 3 * maxReceiveKeys {
		if _, err := r.Open(seal(NewSender(ab), []byte("x"), 5), 5); err != nil {
			t.Fatalf("sender %d: %v", i, err)
		}
	}
	if len(r.keys) > maxReceiveKeys {
		t.Fatalf("receiver keeps %d keys, want at most %d", len(r.keys), maxReceiveKeys)
	}
	// Keys of epochs no longer accepted go when a new key comes.
	if _, err := r.Open(seal(NewSender(ab), []byte("x"), 9), 9); err != nil {
		t.Fatal(err)
	}
	if len(r.keys) != 1 {
		t.Fatalf("after moving on four epochs the receiver keeps %d keys, want 1", len(r.keys))
	}
	// A forged packet (unknown key id, wrong tag) never becomes a key.
	forged := seal(NewSender(ab), []byte("x"), 9)
	forged[len(forged)-1] ^= 1
	if _, err := r.Open(forged, 9); !errors.Is(err, ErrAuth) {
		t.Fatalf("forged: %v", err)
	}
	if len(r.keys) != 1 {
		t.Fatalf("a forged packet added a key")
	}
}

func TestWindow(t *testing.T) {
	var w window
	accept := func(c uint64) bool {
		if !w.fresh(c) {
			return false
		}
		w.mark(c)
		return true
	}
	if accept(0) {
		t.Fatal("counter 0 accepted")
	}
	for _, c := range []uint64{1, 2, 5, 3, 4} { // reordered, all new
		if !accept(c) {
			t.Fatalf("counter %d rejected", c)
		}
	}
	for _, c := range []uint64{1, 3, 5} {
		if accept(c) {
			t.Fatalf("counter %d accepted twice", c)
		}
	}
	if !accept(5 + windowSize - 1) {
		t.Fatal("a jump ahead was rejected")
	}
	// 5 is still inside the window (and seen); 4 just fell out of it.
	if accept(5) || accept(4) {
		t.Fatal("a seen or too old counter was accepted")
	}
	// 6..windowSize+3 are inside and unseen.
	if !accept(6) || !accept(windowSize+3) {
		t.Fatal("an unseen counter inside the window was rejected")
	}
	// A jump far ahead clears everything behind.
	if !accept(10 * windowSize) {
		t.Fatal("far jump rejected")
	}
	if accept(10*windowSize - windowSize) {
		t.Fatal("counter a full window behind accepted")
	}
	if !accept(10*windowSize - windowSize + 1) {
		t.Fatal("oldest counter inside the window rejected after a far jump")
	}
}

func BenchmarkSeal1400(b *testing.B) {
	k1, _ := ecdhKey()
	k2, _ := ecdhKey()
	ab, _ := NewPair(addrA, k1, addrB, k2.PublicKey(), nil)
	s := NewSender(ab)
	buf := make([]byte, HeaderSize+1400+TagSize)
	b.SetBytes(1400)
	for b.Loop() {
		s.Seal(buf, 1400, 1)
	}
}

func ecdhKey() (*ecdh.PrivateKey, error) { return ecdh.X25519().GenerateKey(rand.Reader) }
