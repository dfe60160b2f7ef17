// Package routing finds which peers hold a key (a digest or a tag key) and
// tells peers what this node holds.
package routing

import (
	"context"
	"net/netip"
)

// Router announces keys and looks up the peers that announced them.
type Router interface {
	// Ready reports whether the router can answer lookups: a lone node is
	// ready, a node with bootstrap peers once it has joined one of them.
	Ready(ctx context.Context) (bool, error)
	// Lookup streams the registry addresses of up to count peers (never this
	// node) that hold key. The channel is closed when the lookup ends or ctx is done.
	Lookup(ctx context.Context, key string, count int) (<-chan netip.AddrPort, error)
	// Advertise announces that this node holds keys.
	Advertise(ctx context.Context, keys []string) error
	// Withdraw stops announcing keys.
	Withdraw(ctx context.Context, keys []string) error
}

// Peer is a connected peer, for status pages and metrics.
type Peer struct {
	ID      string
	Address string
}
