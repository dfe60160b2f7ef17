// Package storetest holds an in-memory Store for unit tests of the code
// that reads a store; the containerd store is tested against real containerd.
package storetest

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"sort"
	"sync"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/store"
)

// Memory is a Store whose content is added by the test.
type Memory struct {
	mu    sync.Mutex
	tags  map[string]digest.Digest
	blobs map[digest.Digest][]byte
	types map[digest.Digest]string
}

var _ store.Store = (*Memory)(nil)

// NewMemory returns an empty store.
func NewMemory() *Memory {
	return &Memory{tags: map[string]digest.Digest{}, blobs: map[digest.Digest][]byte{}, types: map[digest.Digest]string{}}
}

// Add stores b with its media type, tags it with tagKeys, and returns its digest.
func (s *Memory) Add(mediaType string, b []byte, tagKeys ...string) digest.Digest {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := digest.FromBytes(b)
	s.blobs[d], s.types[d] = b, mediaType
	for _, k := range tagKeys {
		s.tags[k] = d
	}
	return d
}

// Tag points tagKey at d, whether or not the store holds d.
func (s *Memory) Tag(tagKey string, d digest.Digest) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tags[tagKey] = d
}

func (s *Memory) Resolve(_ context.Context, key string) (digest.Digest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d, ok := s.tags[key]; ok {
		return d, nil
	}
	return "", fmt.Errorf("%s: %w", key, store.ErrNotFound)
}

func (s *Memory) Descriptor(_ context.Context, d digest.Digest) (ocispec.Descriptor, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.blobs[d]
	if !ok {
		return ocispec.Descriptor{}, fmt.Errorf("%s: %w", d, store.ErrNotFound)
	}
	return ocispec.Descriptor{MediaType: s.types[d], Digest: d, Size: int64(len(b))}, nil
}

func (s *Memory) Open(_ context.Context, d digest.Digest) (io.ReadSeekCloser, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, ok := s.blobs[d]
	if !ok {
		return nil, fmt.Errorf("%s: %w", d, store.ErrNotFound)
	}
	return nopCloser{bytes.NewReader(b)}, nil
}

// Keys lists tag keys and digests, sorted.
func (s *Memory) Keys() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]string, 0, len(s.tags)+len(s.blobs))
	for k := range s.tags {
		keys = append(keys, k)
	}
	for d := range s.blobs {
		keys = append(keys, d.String())
	}
	sort.Strings(keys)
	return keys
}

func (s *Memory) Changed() <-chan struct{} { return nil }
func (s *Memory) Ready() error             { return nil }

type nopCloser struct{ io.ReadSeeker }

func (nopCloser) Close() error { return nil }
