package routing

import (
	"sync"

	lru "github.com/hashicorp/golang-lru/simplelru"
)

// syncLRU makes the provider manager's LRU safe to touch from Withdraw; the
// manager itself only uses it under its own lock.
type syncLRU struct {
	mu sync.Mutex
	c  *lru.LRU
}

var _ lru.LRUCache = (*syncLRU)(nil)

func newSyncLRU(size int) (*syncLRU, error) {
	c, err := lru.NewLRU(size, nil)
	if err != nil {
		return nil, err
	}
	return &syncLRU{c: c}, nil
}

func (s *syncLRU) Add(k, v any) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Add(k, v)
}

func (s *syncLRU) Get(k any) (any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Get(k)
}

func (s *syncLRU) Contains(k any) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Contains(k)
}

func (s *syncLRU) Peek(k any) (any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Peek(k)
}

func (s *syncLRU) Remove(k any) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Remove(k)
}

func (s *syncLRU) RemoveOldest() (any, any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.RemoveOldest()
}

func (s *syncLRU) GetOldest() (any, any, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.GetOldest()
}

func (s *syncLRU) Keys() []any {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Keys()
}

func (s *syncLRU) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Len()
}

func (s *syncLRU) Purge() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.c.Purge()
}

func (s *syncLRU) Resize(n int) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.c.Resize(n)
}
