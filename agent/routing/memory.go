package routing

import (
	"context"
	"net/netip"
	"slices"
	"sync"
)

// Memory is an in-process Router shared by several nodes, for unit tests of
// code that uses a Router.
type Memory struct {
	self  netip.AddrPort
	table *memoryTable
}

type memoryTable struct {
	mu        sync.Mutex
	providers map[string][]netip.AddrPort
}

// NewMemory returns routers for each address that share one table.
func NewMemory(addrs ...netip.AddrPort) []*Memory {
	t := &memoryTable{providers: map[string][]netip.AddrPort{}}
	rs := make([]*Memory, len(addrs))
	for i, a := range addrs {
		rs[i] = &Memory{self: a, table: t}
	}
	return rs
}

func (m *Memory) Ready(context.Context) (bool, error) { return true, nil }

func (m *Memory) Lookup(ctx context.Context, key string, count int) (<-chan netip.AddrPort, error) {
	m.table.mu.Lock()
	var found []netip.AddrPort
	for _, a := range m.table.providers[key] {
		if a != m.self && len(found) < count {
			found = append(found, a)
		}
	}
	m.table.mu.Unlock()
	ch := make(chan netip.AddrPort, len(found))
	for _, a := range found {
		ch <- a
	}
	close(ch)
	return ch, nil
}

func (m *Memory) Advertise(_ context.Context, keys []string) error {
	m.table.mu.Lock()
	defer m.table.mu.Unlock()
	for _, k := range keys {
		if !slices.Contains(m.table.providers[k], m.self) {
			m.table.providers[k] = append(m.table.providers[k], m.self)
		}
	}
	return nil
}

func (m *Memory) Withdraw(_ context.Context, keys []string) error {
	m.table.mu.Lock()
	defer m.table.mu.Unlock()
	for _, k := range keys {
		m.table.providers[k] = slices.DeleteFunc(m.table.providers[k], func(a netip.AddrPort) bool { return a == m.self })
	}
	return nil
}
