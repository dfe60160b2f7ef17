package store

import (
	"context"
	"fmt"
	"log/slog"
	"slices"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/fleetmirror/fleetmirror/agent/oci"
)

// index is one consistent snapshot of what the node can serve. It is never
// modified once built, so readers may keep using an old one while a sync
// builds the next.
type index struct {
	tags  map[string]digest.Digest
	descs map[digest.Digest]ocispec.Descriptor
	keys  []string // sorted tag keys and digests
}

func emptyIndex() *index {
	return &index{tags: map[string]digest.Digest{}, descs: map[digest.Digest]ocispec.Descriptor{}}
}

// indexer builds indexes. It remembers the children of the manifests and
// indexes it has read: content is addressed by its digest, so a blob's
// children never change and a sync only reads blobs it has not seen.
type indexer struct {
	log      *slog.Logger
	children map[digest.Digest][]ocispec.Descriptor
}

func newIndexer(log *slog.Logger) *indexer {
	return &indexer{log: log, children: map[digest.Digest][]ocispec.Descriptor{}}
}

// build indexes imgs. present holds the size of every blob in the
// namespace's content store; cs reads the manifests and indexes among them.
func (x *indexer) build(ctx context.Context, imgs []images.Image, present map[digest.Digest]int64, cs content.Provider) (*index, error) {
	idx := emptyIndex()
	for _, img := range imgs {
		if _, ok := present[img.Target.Digest]; !ok {
			// An image record can precede or outlive its content; a tag we
			// cannot serve the manifest of must not be advertised.
			continue
		}
		if key := tagKey(img.Name); key != "" {
			idx.tags[key] = img.Target.Digest
		}
		if err := x.walk(ctx, img.Target, present, cs, idx.descs); err != nil {
			return nil, fmt.Errorf("walking image %s: %w", img.Name, err)
		}
	}
	for d := range x.children {
		if _, ok := present[d]; !ok {
			delete(x.children, d)
		}
	}
	idx.keys = make([]string, 0, len(idx.tags)+len(idx.descs))
	for k := range idx.tags {
		idx.keys = append(idx.keys, k)
	}
	for d := range idx.descs {
		idx.keys = append(idx.keys, d.String())
	}
	slices.Sort(idx.keys)
	return idx, nil
}

// walk records root and everything below it that is present. Absent
// content is skipped rather than an error: indexes list platforms never
// pulled, and containerd may discard layers once unpacked.
func (x *indexer) walk(ctx context.Context, root ocispec.Descriptor, present map[digest.Digest]int64, cs content.Provider, descs map[digest.Digest]ocispec.Descriptor) error {
	stack := []ocispec.Descriptor{root}
	for len(stack) > 0 {
		d := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		size, ok := present[d.Digest]
		if !ok {
			continue
		}
		if _, seen := descs[d.Digest]; seen {
			continue
		}
		// The size is the store's: it is what Open will return.
		desc := ocispec.Descriptor{MediaType: d.MediaType, Digest: d.Digest, Size: size}
		if !images.IsIndexType(d.MediaType) && !images.IsManifestType(d.MediaType) {
			descs[d.Digest] = desc
			continue
		}
		kids, err := x.childrenOf(ctx, desc, cs)
		if errdefs.IsNotFound(err) {
			continue // deleted since the content was listed
		}
		if err != nil {
			return err
		}
		descs[d.Digest] = desc
		stack = append(stack, kids...)
	}
	return nil
}

func (x *indexer) childrenOf(ctx context.Context, desc ocispec.Descriptor, cs content.Provider) ([]ocispec.Descriptor, error) {
	if kids, ok := x.children[desc.Digest]; ok {
		return kids, nil
	}
	b, err := content.ReadBlob(ctx, cs, desc)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", desc.Digest, err)
	}
	kids, err := oci.Children(b)
	if err != nil {
		// Still served as a blob; there is just nothing below it to walk.
		x.log.Warn("unparsable manifest in content store", "digest", desc.Digest, "mediaType", desc.MediaType, "err", err)
	}
	x.children[desc.Digest] = kids
	return kids, nil
}

// tagKey returns the tag key of a containerd image name, or "" for names
// that are not a plain tag: "sha256:<config>" records CRI adds,
// "repo@sha256:..." and "repo:tag@sha256:..." pins, and short names, which
// containerd's k8s.io namespace never holds and whose registry would be a
// guess.
func tagKey(name string) string {
	if _, err := digest.Parse(name); err == nil {
		return ""
	}
	img, err := oci.ParseImage(name)
	if err != nil || img.Digest != "" {
		return ""
	}
	return img.TagKey()
}
