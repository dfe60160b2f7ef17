// Package store is what the agent knows of the node's containerd: which
// images and content it holds, and the bytes of that content.
package store

import (
	"context"
	"errors"
	"io"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// ErrNotFound is returned when the node does not hold a tag or digest.
var ErrNotFound = errors.New("not found in the content store")

// Store is the read-only view of a node's images the registry serves from.
type Store interface {
	// Resolve returns the manifest digest a tag key ("docker.io/library/nginx:1.27") points at.
	Resolve(ctx context.Context, tagKey string) (digest.Digest, error)
	// Descriptor returns the media type and size of content the node holds.
	Descriptor(ctx context.Context, dgst digest.Digest) (ocispec.Descriptor, error)
	// Open returns the content's bytes; the caller closes it.
	Open(ctx context.Context, dgst digest.Digest) (io.ReadSeekCloser, error)
	// Keys lists everything the node can serve: tag keys of its images and
	// the digests of their content that is present.
	Keys() []string
	// Changed is signalled (coalesced) whenever Keys may have changed.
	Changed() <-chan struct{}
	// Ready returns nil once the store is in step with containerd, or why not.
	Ready() error
}
