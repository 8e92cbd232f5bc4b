package checksum

import (
	"encoding/binary"
	"encoding/hex"
	"testing"
)

func TestIPv4Header(t *testing.T) {
	// 192.168.0.1 -> 192.168.0.199, UDP, TTL 64, DF, 115 bytes.
	h, _ := hex.DecodeString("450000730000400040110000c0a80001c0a800c7")
	if got := IPv4Header(h); got != 0xb861 {
		t.Fatalf("checksum %#04x, want 0xb861", got)
	}
	// A receiver summing the header with its checksum in place gets 0.
	binary.BigEndian.PutUint16(h[10:], 0xb861)
	if got := IPv4Header(h); got != 0 {
		t.Errorf("checksum over a checksummed header %#04x, want 0", got)
	}
}
