package overlay

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Source filtering. VXLAN has no authentication: anyone who can send UDP
// to port 4789 of a host could put frames into its overlays. So every
// VXLAN packet for a VNI of this package must come from a member host of
// that overlay (SetPeers' remote hosts); the rest is dropped before it
// reaches the VXLAN socket. An nftables table in the host namespace does
// it, one per Host:
//
//	table inet <prefix>vxlan {
//	    set vnis      { integer }                  # our VNIs
//	    set members4  { integer . ipv4_addr }      # VNI . member host
//	    set members6  { integer . ipv6_addr }
//	    chain input {
//	        type filter hook input priority -10; policy accept;
//	        meta l4proto udp udp dport 4789 @th,96,24 @vnis goto vxlan
//	    }
//	    chain vxlan {
//	        meta nfproto ipv4 @th,96,24 . ip saddr @members4 accept
//	        meta nfproto ipv6 @th,96,24 . ip6 saddr @members6 accept
//	        counter drop
//	    }
//	}
//
// (@th,96,24 is the VNI: bytes 4-6 of the VXLAN header after the 8-byte
// UDP header.) A kernel without nftables (the netlink calls answer "not
// supported") cannot filter: the overlays then work unfiltered, as
// Docker's own overlay driver does, with one warning in the log and the
// reason in State.Filter.Unavailable (doctor shows it). Packets of other VNIs, such as those of Docker's own
// overlay driver on the same port, pass untouched. Encrypted overlays'
// VNIs are in vnis with no members: their VXLAN never arrives in clear
// from the underlay, so any that does is dropped. A VNI is added before
// its VXLAN device exists and removed after the device is gone, and the
// table persists across plugin restarts like the devices.

const (
	filterInput    = "input"
	filterVXLAN    = "vxlan"
	filterVNIs     = "vnis"
	filterMembers4 = "members4"
	filterMembers6 = "members6"
)

// filterTable is the name of this Host's table.
func (h *Host) filterTable() *nftables.Table {
	return &nftables.Table{Name: h.prefix() + "vxlan", Family: nftables.TableFamilyINet}
}

func filterSets(t *nftables.Table) (vnis, m4, m6 *nftables.Set) {
	vnis = &nftables.Set{Table: t, Name: filterVNIs, KeyType: nftables.TypeInteger}
	m4 = &nftables.Set{Table: t, Name: filterMembers4, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeInteger, nftables.TypeIPAddr)}
	m6 = &nftables.Set{Table: t, Name: filterMembers6, Concatenation: true,
		KeyType: nftables.MustConcatSetType(nftables.TypeInteger, nftables.TypeIP6Addr)}
	return vnis, m4, m6
}

// vniKey is a VNI as the rules load it into a register: its 3 bytes from
// the VXLAN header, then a zero byte.
func vniKey(vni uint32) []byte {
	b := make([]byte, 4)
	binary.BigEndian.PutUint32(b, vni<<8)
	return b
}

func memberKey(vni uint32, host netip.Addr) []byte {
	return append(vniKey(vni), host.AsSlice()...)
}

// errNoNftables: this kernel has no nftables.
var errNoNftables = errors.New("this kernel has no nftables: VXLAN is not filtered by source")

// noFilter reports whether err says the kernel has no nftables; the first
// time, it logs that overlays go unfiltered.
func (h *Host) noFilter(err error) bool {
	if !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, errNoNftables) {
		return false
	}
	h.nftWarn.Do(func() {
		slog.Warn("source filter unavailable: VXLAN from any address reaches the overlays (as with Docker's own overlay driver)", "err", err)
	})
	return true
}

func (s *handles) nft() (*nftables.Conn, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(s.hostNS)))
	if err != nil {
		return nil, fmt.Errorf("nftables: %w", err)
	}
	return c, nil
}

// ensureFilter creates the table if it does not exist; an existing one is
// left alone (its sets hold the members of running overlays).
func (h *Host) ensureFilter(c *nftables.Conn) error {
	t := h.filterTable()
	if _, err := c.ListTableOfFamily(t.Name, t.Family); err == nil {
		if _, err := c.GetSetByName(t, filterMembers6); err == nil {
			return nil
		}
		// Half made (cannot happen in one batch, but an operator may have
		// edited it): make it again.
		c.DelTable(t)
	} else if !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("nftables: find table %s: %w", t.Name, err)
	}
	c.AddTable(t)
	vnis, m4, m6 := filterSets(t)
	for _, set := range []*nftables.Set{vnis, m4, m6} {
		if err := c.AddSet(set, nil); err != nil {
			return fmt.Errorf("nftables: set %s: %w", set.Name, err)
		}
	}
	policy := nftables.ChainPolicyAccept
	input := c.AddChain(&nftables.Chain{
		Name: filterInput, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityRef(-10), Policy: &policy,
	})
	vx := c.AddChain(&nftables.Chain{Name: filterVXLAN, Table: t})
	c.AddRule(&nftables.Rule{Table: t, Chain: input, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(VXLANPort)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 12, Len: 3},
		&expr.Lookup{SourceRegister: 1, SetName: vnis.Name, SetID: vnis.ID},
		&expr.Verdict{Kind: expr.VerdictGoto, Chain: filterVXLAN},
	}})
	for _, m := range []struct {
		proto    byte
		set      *nftables.Set
		off, len uint32
	}{
		{unix.NFPROTO_IPV4, m4, 12, 4},
		{unix.NFPROTO_IPV6, m6, 8, 16},
	} {
		c.AddRule(&nftables.Rule{Table: t, Chain: vx, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{m.proto}},
			// VNI . source address, in consecutive 32-bit registers.
			&expr.Payload{DestRegister: 8, Base: expr.PayloadBaseTransportHeader, Offset: 12, Len: 3},
			&expr.Payload{DestRegister: 9, Base: expr.PayloadBaseNetworkHeader, Offset: m.off, Len: m.len},
			&expr.Lookup{SourceRegister: 8, SetName: m.set.Name, SetID: m.set.ID},
			&expr.Verdict{Kind: expr.VerdictAccept},
		}})
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: vx, Exprs: []expr.Any{
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	}})
	if err := c.Flush(); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			return errNoNftables
		}
		return fmt.Errorf("nftables: create table %s: %w", t.Name, err)
	}
	return nil
}

// nftProbe is what filterProbe found: nil or errNoNftables, once known.
var nftProbe struct {
	sync.Mutex
	done bool
	err  error
}

// filterProbe reports whether this kernel can hold the filter table
// (errNoNftables if it cannot), by making it in a throwaway namespace;
// the answer is kept, as a kernel does not change while it runs.
func (h *Host) filterProbe() error {
	nftProbe.Lock()
	defer nftProbe.Unlock()
	if nftProbe.done {
		return nftProbe.err
	}
	err := inNewNetNS(func() error {
		c, err := nftables.New()
		if err != nil {
			return err
		}
		return h.ensureFilter(c)
	})
	if err == nil || errors.Is(err, errNoNftables) {
		nftProbe.done, nftProbe.err = true, err
	}
	return err
}

// filterConn is the nftables connection of the network's namespace, with
// the filter table made. It is nil when there is an error, and also
// without one when this kernel has no nftables (noFilter warns once).
func (h *Host) filterConn(s *handles) (*nftables.Conn, error) {
	c, err := s.nft()
	if err != nil {
		return nil, err
	}
	if err := h.ensureFilter(c); err != nil {
		if h.noFilter(err) {
			return nil, nil
		}
		return nil, err
	}
	return c, nil
}

// filterAddVNI makes VXLAN packets of vni subject to the filter; its
// members stay as they are (none for a new VNI: nothing passes).
func (h *Host) filterAddVNI(s *handles, vni uint32) error {
	c, err := h.filterConn(s)
	if c == nil {
		return err
	}
	vnis, _, _ := filterSets(h.filterTable())
	if err := c.SetAddElements(vnis, []nftables.SetElement{{Key: vniKey(vni)}}); err != nil {
		return fmt.Errorf("nftables: add vni %d: %w", vni, err)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: add vni %d: %w", vni, err)
	}
	return nil
}

// filterSetMembers makes hosts exactly the members of vni.
func (h *Host) filterSetMembers(s *handles, vni uint32, hosts []netip.Addr) (int, error) {
	c, err := h.filterConn(s)
	if c == nil {
		return 0, err
	}
	_, m4, m6 := filterSets(h.filterTable())
	want := map[string]bool{}
	for _, ip := range hosts {
		want[string(memberKey(vni, ip))] = true
	}
	changes := 0
	for _, set := range []*nftables.Set{m4, m6} {
		have, err := c.GetSetElements(set)
		if err != nil {
			return 0, fmt.Errorf("nftables: list %s: %w", set.Name, err)
		}
		var del, add []nftables.SetElement
		seen := map[string]bool{}
		for _, e := range have {
			k := string(e.Key)
			seen[k] = true
			if len(e.Key) > 4 && binary.BigEndian.Uint32(e.Key)>>8 == vni && !want[k] {
				del = append(del, nftables.SetElement{Key: e.Key})
			}
		}
		for _, ip := range hosts {
			k := memberKey(vni, ip)
			if len(k) == int(set.KeyType.Bytes) && !seen[string(k)] {
				add = append(add, nftables.SetElement{Key: k})
			}
		}
		if len(del) > 0 {
			if err := c.SetDeleteElements(set, del); err != nil {
				return 0, err
			}
		}
		if len(add) > 0 {
			if err := c.SetAddElements(set, add); err != nil {
				return 0, err
			}
		}
		changes += len(del) + len(add)
	}
	if changes == 0 {
		return 0, nil
	}
	if err := c.Flush(); err != nil {
		return 0, fmt.Errorf("nftables: members of vni %d: %w", vni, err)
	}
	return changes, nil
}

// filterAddMembers makes hosts members of vni, besides the others.
func (h *Host) filterAddMembers(s *handles, vni uint32, hosts []netip.Addr) error {
	c, err := h.filterConn(s)
	if c == nil {
		return err
	}
	_, m4, m6 := filterSets(h.filterTable())
	for _, ip := range hosts {
		if err := c.SetAddElements(memberSet(m4, m6, ip), []nftables.SetElement{{Key: memberKey(vni, ip)}}); err != nil {
			return fmt.Errorf("nftables: add member %s of vni %d: %w", ip, vni, err)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: add members of vni %d: %w", vni, err)
	}
	return nil
}

// memberSet is m4 or m6, for ip's family.
func memberSet(m4, m6 *nftables.Set, ip netip.Addr) *nftables.Set {
	if ip.Is4() {
		return m4
	}
	return m6
}

// existingFilter is the nftables connection of the network's namespace and
// the filter table, if the table is there: nil when there is an error, and
// also without one when there is no table or no nftables.
func (h *Host) existingFilter(s *handles) (*nftables.Conn, *nftables.Table, error) {
	c, err := s.nft()
	if err != nil {
		return nil, nil, err
	}
	t := h.filterTable()
	if _, err := c.ListTableOfFamily(t.Name, t.Family); errors.Is(err, unix.ENOENT) || h.noFilter(err) {
		return nil, nil, nil
	}
	return c, t, nil
}

// filterRemoveMembers makes hosts no members of vni; the others stay.
func (h *Host) filterRemoveMembers(s *handles, vni uint32, hosts []netip.Addr) error {
	c, t, err := h.existingFilter(s)
	if c == nil {
		return err
	}
	_, m4, m6 := filterSets(t)
	// One transaction each: one that deletes a missing element fails as a
	// whole.
	for _, ip := range hosts {
		if err := c.SetDeleteElements(memberSet(m4, m6, ip), []nftables.SetElement{{Key: memberKey(vni, ip)}}); err != nil {
			return fmt.Errorf("nftables: remove member %s of vni %d: %w", ip, vni, err)
		}
		if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("nftables: remove member %s of vni %d: %w", ip, vni, err)
		}
	}
	return nil
}

// filterRemoveVNI forgets vni and its members; the table goes with the
// last VNI.
func (h *Host) filterRemoveVNI(s *handles, vni uint32) error {
	c, t, err := h.existingFilter(s)
	if c == nil {
		return err
	}
	if _, err := h.filterSetMembers(s, vni, nil); err != nil {
		return err
	}
	vnis, _, _ := filterSets(t)
	have, err := c.GetSetElements(vnis)
	if err != nil {
		return fmt.Errorf("nftables: list %s: %w", vnis.Name, err)
	}
	left := slices.DeleteFunc(have, func(e nftables.SetElement) bool { return string(e.Key) == string(vniKey(vni)) })
	if len(left) == 0 {
		c.DelTable(t)
	} else if err := c.SetDeleteElements(vnis, []nftables.SetElement{{Key: vniKey(vni)}}); err != nil {
		return err
	}
	if err := c.Flush(); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("nftables: remove vni %d: %w", vni, err)
	}
	return nil
}

// FilterState is what the source filter holds for one VNI, for operators
// and tests.
type FilterState struct {
	Filtered bool         // the VNI is in the filter
	Members  []netip.Addr // hosts whose VXLAN for the VNI is let in
	// Unavailable says why there is no filter at all (a kernel without
	// nftables); empty when there is one.
	Unavailable string
}

func (h *Host) filterState(s *handles, vni uint32) (FilterState, error) {
	var st FilterState
	c, err := s.nft()
	if err != nil {
		return st, err
	}
	t := h.filterTable()
	_, err = c.ListTableOfFamily(t.Name, t.Family)
	switch {
	case errors.Is(err, unix.ENOENT):
		// No table: none made yet, or none can be (a kernel that lists
		// tables but cannot hold this one).
		if errors.Is(h.filterProbe(), errNoNftables) {
			st.Unavailable = errNoNftables.Error()
		}
		return st, nil
	case h.noFilter(err):
		st.Unavailable = errNoNftables.Error()
		return st, nil
	}
	vnis, m4, m6 := filterSets(t)
	have, err := c.GetSetElements(vnis)
	if err != nil {
		return st, fmt.Errorf("nftables: list %s: %w", vnis.Name, err)
	}
	st.Filtered = slices.ContainsFunc(have, func(e nftables.SetElement) bool { return string(e.Key) == string(vniKey(vni)) })
	for _, set := range []*nftables.Set{m4, m6} {
		els, err := c.GetSetElements(set)
		if err != nil {
			return st, fmt.Errorf("nftables: list %s: %w", set.Name, err)
		}
		for _, e := range els {
			if len(e.Key) > 4 && binary.BigEndian.Uint32(e.Key)>>8 == vni {
				if a, ok := netip.AddrFromSlice(e.Key[4:]); ok {
					st.Members = append(st.Members, a)
				}
			}
		}
	}
	slices.SortFunc(st.Members, func(a, b netip.Addr) int { return a.Compare(b) })
	return st, nil
}
