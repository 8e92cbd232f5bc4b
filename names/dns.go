package names

import (
	"net"
	"net/netip"
	"strings"

	"github.com/miekg/dns"
)

// ttl of every answer, in seconds: names change as containers come and
// go, and nothing should keep an old answer.
const ttl = 0

// answer is the reply to query q that came in on overlay's name server
// from src. Names of the overlays of src's container get their addresses
// (A, AAAA) and addresses their names (PTR); anything else is REFUSED, so
// that Docker's embedded DNS asks its next server (the host's usual
// resolvers) instead.
func answer(ix *index, overlay string, src netip.Addr, q *dns.Msg) *dns.Msg {
	resp := new(dns.Msg)
	if q.Opcode != dns.OpcodeQuery || len(q.Question) != 1 || q.Question[0].Qclass != dns.ClassINET {
		return resp.SetRcode(q, dns.RcodeRefused)
	}
	question := q.Question[0]
	overlays := ix.overlaysFor(overlay, src)
	if question.Qtype == dns.TypePTR {
		if addr, ok := reverseAddr(question.Name); ok {
			if name := ix.reverse(overlays, addr); name != "" {
				resp.SetReply(q)
				resp.Authoritative = true
				resp.Answer = append(resp.Answer, &dns.PTR{
					Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypePTR, Class: dns.ClassINET, Ttl: ttl},
					Ptr: dns.Fqdn(name),
				})
				return resp
			}
		}
		return resp.SetRcode(q, dns.RcodeRefused)
	}
	addrs, found := ix.lookup(overlays, question.Name)
	if !found {
		return resp.SetRcode(q, dns.RcodeRefused)
	}
	// The name is ours: every type gets an answer from here, if only an
	// empty one (an AAAA query for a name with IPv4 only, say).
	resp.SetReply(q)
	resp.Authoritative = true
	for _, a := range addrs {
		switch {
		case question.Qtype == dns.TypeA && a.Is4():
			resp.Answer = append(resp.Answer, &dns.A{
				Hdr: dns.RR_Header{Name: question.Name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl},
				A:   net.IP(a.AsSlice()),
			})
		case question.Qtype == dns.TypeAAAA && a.Is6():
			resp.Answer = append(resp.Answer, &dns.AAAA{
				Hdr:  dns.RR_Header{Name: question.Name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: ttl},
				AAAA: net.IP(a.AsSlice()),
			})
		}
	}
	return resp
}

// reverseAddr parses a PTR query name (in-addr.arpa or ip6.arpa).
func reverseAddr(name string) (netip.Addr, bool) {
	name = strings.ToLower(dns.Fqdn(name))
	if rest, ok := strings.CutSuffix(name, ".in-addr.arpa."); ok {
		parts := strings.Split(rest, ".")
		if len(parts) != 4 {
			return netip.Addr{}, false
		}
		for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
			parts[i], parts[j] = parts[j], parts[i]
		}
		a, err := netip.ParseAddr(strings.Join(parts, "."))
		return a, err == nil && a.Is4()
	}
	if rest, ok := strings.CutSuffix(name, ".ip6.arpa."); ok {
		nibbles := strings.Split(rest, ".")
		if len(nibbles) != 32 {
			return netip.Addr{}, false
		}
		var b [16]byte
		for i, n := range nibbles {
			if len(n) != 1 {
				return netip.Addr{}, false
			}
			v := strings.IndexByte("0123456789abcdef", n[0])
			if v < 0 {
				return netip.Addr{}, false
			}
			pos := 31 - i // nibbles come least significant first
			if pos%2 == 0 {
				b[pos/2] |= byte(v) << 4
			} else {
				b[pos/2] |= byte(v)
			}
		}
		return netip.AddrFrom16(b), true
	}
	return netip.Addr{}, false
}

// refused answers everything with REFUSED: the name server's address in
// the host's own namespace, which containers that are on no overlay of
// this plugin reach, and which then ask their next server at once.
func refused(w dns.ResponseWriter, q *dns.Msg) {
	w.WriteMsg(new(dns.Msg).SetRcode(q, dns.RcodeRefused))
}

// serveOverlayDNS is the handler of overlay's name server.
func (s *Service) serveOverlayDNS(overlay string) dns.HandlerFunc {
	return func(w dns.ResponseWriter, q *dns.Msg) {
		var src netip.Addr
		switch a := w.RemoteAddr().(type) {
		case *net.UDPAddr:
			src, _ = netip.AddrFromSlice(a.IP)
		case *net.TCPAddr:
			src, _ = netip.AddrFromSlice(a.IP)
		}
		resp := answer(s.idx.Load(), overlay, src.Unmap(), q)
		size := dns.MinMsgSize
		if w.LocalAddr().Network() == "tcp" {
			size = dns.MaxMsgSize
		} else if opt := q.IsEdns0(); opt != nil && int(opt.UDPSize()) > size {
			size = int(opt.UDPSize())
		}
		resp.Truncate(size)
		w.WriteMsg(resp)
	}
}
