package routing

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"

	"github.com/libp2p/go-libp2p/core/peer"
	ma "github.com/multiformats/go-multiaddr"
	manet "github.com/multiformats/go-multiaddr/net"
)

// peerIP picks the IP to reach a peer's registry on: the addresses it
// advertises (its --router-addr, the node IP) first, then the address of a
// connection to it. Loopback is a last resort, since on a real cluster it
// would point at us.
func (p *P2P) peerIP(ai peer.AddrInfo) (netip.Addr, bool) {
	var fallback netip.Addr
	pick := func(addrs []ma.Multiaddr) (netip.Addr, bool) {
		for _, m := range addrs {
			ip, ok := multiaddrIP(m)
			if !ok {
				continue
			}
			if ip.IsLoopback() {
				if !fallback.IsValid() {
					fallback = ip
				}
				continue
			}
			return ip, true
		}
		return netip.Addr{}, false
	}
	var conns []ma.Multiaddr
	for _, c := range p.host.Network().ConnsToPeer(ai.ID) {
		conns = append(conns, c.RemoteMultiaddr())
	}
	// A connection's address is its source address, which a multi-homed
	// node (or loopback in tests) can pick apart from where it listens.
	for _, set := range [][]ma.Multiaddr{ai.Addrs, p.host.Peerstore().Addrs(ai.ID), conns} {
		if ip, ok := pick(set); ok {
			return ip, true
		}
	}
	return fallback, fallback.IsValid()
}

// multiaddrIP returns the IP of a direct IP multiaddr.
func multiaddrIP(m ma.Multiaddr) (netip.Addr, bool) {
	if m == nil {
		return netip.Addr{}, false
	}
	if _, err := m.ValueForProtocol(ma.P_CIRCUIT); err == nil {
		return netip.Addr{}, false // relayed: the IP is the relay's
	}
	nip, err := manet.ToIP(m)
	if err != nil {
		return netip.Addr{}, false
	}
	ip, ok := netip.AddrFromSlice(nip)
	if !ok {
		return netip.Addr{}, false
	}
	ip = ip.Unmap()
	if ip.IsUnspecified() || ip.IsMulticast() || ip.IsLinkLocalUnicast() {
		return netip.Addr{}, false
	}
	return ip, true
}

func listenMultiaddr(hostPort string) (ma.Multiaddr, error) {
	h, ps, err := net.SplitHostPort(hostPort)
	if err != nil {
		return nil, fmt.Errorf("routing: listen address %q: %w", hostPort, err)
	}
	port, err := strconv.ParseUint(ps, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("routing: listen address %q: bad port", hostPort)
	}
	ip := netip.IPv4Unspecified()
	if h != "" {
		if ip, err = netip.ParseAddr(h); err != nil {
			return nil, fmt.Errorf("routing: listen address %q: host must be an IP: %w", hostPort, err)
		}
	}
	if ip.Zone() != "" {
		return nil, fmt.Errorf("routing: listen address %q: zones are not supported", hostPort)
	}
	ip = ip.Unmap()
	proto := "ip4"
	if ip.Is6() {
		proto = "ip6"
	}
	return ma.NewMultiaddr(fmt.Sprintf("/%s/%s/tcp/%d", proto, ip, port))
}
