// Package checksum computes the Internet checksum (RFC 1071).
package checksum

import "encoding/binary"

// IPv4Header is the checksum of an IPv4 header h, whose checksum field
// (h[10:12]) is zero: the one's complement of the one's complement sum of
// its 16-bit words. A last odd byte is not counted (a header never has
// one).
func IPv4Header(h []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(h); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(h[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}
