package crypt

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
)

// Wire format of one encrypted VXLAN packet, the payload of a UDP datagram
// between the data paths of two hosts:
//
//	0      version (1)
//	1..3   zero
//	4..7   epoch, big endian
//	8..15  key id, big endian: chosen at random by the sender per key
//	16..23 counter, big endian: 1, 2, 3, ... per key; the GCM nonce is
//	       4 zero bytes and the counter
//	24..   the VXLAN header and frame, sealed with AES-256-GCM (the 24
//	       bytes before are the additional data), then the 16-byte tag
const (
	version    = 1
	HeaderSize = 24
	TagSize    = 16
	// Overhead is what the encryption adds to a VXLAN packet on the
	// underlay, compared with plain VXLAN (whose outer IP and UDP headers
	// the encrypted packet's own replace).
	Overhead = HeaderSize + TagSize
)

// Errors for packets that are dropped; the data path counts them.
var (
	ErrMalformed = errors.New("malformed packet")
	ErrEpoch     = errors.New("epoch not accepted now")
	ErrAuth      = errors.New("authentication failed")
	ErrReplay    = errors.New("replayed or too old")
)

func newGCM(key []byte) cipher.AEAD {
	b, err := aes.NewCipher(key)
	if err != nil {
		panic(err) // KeySize is a valid AES key size
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		panic(err)
	}
	return g
}

func nonce(counter uint64) []byte {
	var n [12]byte
	binary.BigEndian.PutUint64(n[4:], counter)
	return n[:]
}

// Sender seals the packets this host sends to one remote host. It is not
// safe for concurrent use.
type Sender struct {
	pair    *Pair
	epoch   uint32
	id      uint64
	aead    cipher.AEAD
	counter uint64
}

// NewSender seals with the keys of pair.
func NewSender(pair *Pair) *Sender { return &Sender{pair: pair} }

// Pair is the pair the sender derives its keys from.
func (s *Sender) Pair() *Pair { return s.pair }

// Seal encrypts plain, which must start HeaderSize bytes into buf: it
// writes the header into buf[:HeaderSize] and the sealed plain and tag
// after it, and returns the packet (buf[:HeaderSize+len(plain)+TagSize]).
// buf needs TagSize bytes of capacity beyond plain. A new epoch, or the
// first packet, starts a new key with a new random id.
func (s *Sender) Seal(buf []byte, plainLen int, epoch uint32) []byte {
	if s.aead == nil || epoch != s.epoch || s.counter == 1<<62 {
		s.epoch, s.id, s.counter = epoch, randomID(), 0
		s.aead = newGCM(s.pair.SendKey(epoch, s.id))
	}
	s.counter++
	h := buf[:HeaderSize]
	h[0], h[1], h[2], h[3] = version, 0, 0, 0
	binary.BigEndian.PutUint32(h[4:], s.epoch)
	binary.BigEndian.PutUint64(h[8:], s.id)
	binary.BigEndian.PutUint64(h[16:], s.counter)
	plain := buf[HeaderSize : HeaderSize+plainLen]
	s.aead.Seal(plain[:0], nonce(s.counter), plain, h)
	return buf[:HeaderSize+plainLen+TagSize]
}

// KeyInUse is the epoch and id of the key the sender last sealed with.
func (s *Sender) KeyInUse() (epoch uint32, id uint64) { return s.epoch, s.id }

func randomID() uint64 {
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(fmt.Sprintf("crypto/rand: %v", err))
	}
	return binary.BigEndian.Uint64(b[:])
}

// maxReceiveKeys bounds the keys a Receiver keeps per remote host: the
// keys of three epochs, with room for the sender's restarts.
const maxReceiveKeys = 8

// Receiver opens the packets one remote host sends to this host. It is
// not safe for concurrent use.
type Receiver struct {
	pair *Pair
	keys []*receiveKey
	tick uint64 // for least recently used eviction
	// NewKey, if set, is called for each key the receiver starts accepting.
	NewKey func(epoch uint32, id uint64)
}

type receiveKey struct {
	epoch  uint32
	id     uint64
	aead   cipher.AEAD
	window window
	used   uint64
}

// NewReceiver opens with the keys of pair.
func NewReceiver(pair *Pair) *Receiver { return &Receiver{pair: pair} }

// Pair is the pair the receiver derives its keys from.
func (r *Receiver) Pair() *Pair { return r.pair }

// Open checks and decrypts packet in place and returns the plaintext (the
// VXLAN header and frame), which starts HeaderSize bytes into packet.
// now is the current epoch.
func (r *Receiver) Open(packet []byte, now uint32) ([]byte, error) {
	if len(packet) < HeaderSize+TagSize || packet[0] != version || packet[1]|packet[2]|packet[3] != 0 {
		return nil, ErrMalformed
	}
	h := packet[:HeaderSize]
	epoch := binary.BigEndian.Uint32(h[4:])
	id := binary.BigEndian.Uint64(h[8:])
	counter := binary.BigEndian.Uint64(h[16:])
	if !acceptable(epoch, now) {
		return nil, ErrEpoch
	}
	k := r.find(epoch, id)
	fresh := k == nil
	if fresh {
		k = &receiveKey{epoch: epoch, id: id, aead: newGCM(r.pair.ReceiveKey(epoch, id))}
	}
	if !k.window.fresh(counter) {
		return nil, ErrReplay
	}
	sealed := packet[HeaderSize:]
	plain, err := k.aead.Open(sealed[:0], nonce(counter), sealed, h)
	if err != nil {
		return nil, ErrAuth
	}
	// Only an authentic packet may change state.
	k.window.mark(counter)
	r.tick++
	k.used = r.tick
	if fresh {
		r.keep(k, now)
		if r.NewKey != nil {
			r.NewKey(epoch, id)
		}
	}
	return plain, nil
}

func (r *Receiver) find(epoch uint32, id uint64) *receiveKey {
	for _, k := range r.keys {
		if k.epoch == epoch && k.id == id {
			return k
		}
	}
	return nil
}

// keep adds k, dropping keys of epochs no longer accepted and, beyond
// maxReceiveKeys, the least recently used.
func (r *Receiver) keep(k *receiveKey, now uint32) {
	kept := r.keys[:0]
	for _, o := range r.keys {
		if acceptable(o.epoch, now) {
			kept = append(kept, o)
		}
	}
	r.keys = append(kept, k)
	for len(r.keys) > maxReceiveKeys {
		oldest := 0
		for i, o := range r.keys {
			if o.used < r.keys[oldest].used {
				oldest = i
			}
		}
		r.keys = append(r.keys[:oldest], r.keys[oldest+1:]...)
	}
}

// windowSize is how far behind the newest counter a packet may arrive.
const windowSize = 1024

// window is an anti-replay window over the counters of one key.
type window struct {
	top  uint64 // highest counter accepted; 0 before the first
	bits [windowSize / 64]uint64
}

// fresh says whether counter may be accepted: never seen, not too old.
func (w *window) fresh(counter uint64) bool {
	switch {
	case counter == 0:
		return false
	case counter > w.top:
		return true
	case w.top-counter >= windowSize:
		return false
	}
	i := counter % windowSize
	return w.bits[i/64]&(1<<(i%64)) == 0
}

// mark records counter as seen; call it only after fresh said yes and the
// packet was authentic.
func (w *window) mark(counter uint64) {
	if counter > w.top {
		if counter-w.top >= windowSize {
			w.bits = [windowSize / 64]uint64{}
		} else {
			for c := w.top + 1; c < counter; c++ {
				i := c % windowSize
				w.bits[i/64] &^= 1 << (i % 64)
			}
		}
		w.top = counter
	}
	i := counter % windowSize
	w.bits[i/64] |= 1 << (i % 64)
}
