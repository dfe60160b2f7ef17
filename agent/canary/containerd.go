package canary

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"google.golang.org/grpc"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// criNamespace is where CRI keeps images and content, whatever namespace
// the agent mirrors.
const criNamespace = "k8s.io"

// Node is the node's containerd as one canary run uses it.
type Node interface {
	// Version is containerd's version, e.g. "v2.4.2" or "1.6.20~ds1".
	Version(ctx context.Context) (string, error)
	// Pull pulls ref through the CRI image service, as the kubelet does.
	Pull(ctx context.Context, ref string) error
	// Remove removes ref through the CRI image service.
	Remove(ctx context.Context, ref string) error
	// Images lists the names (tags and digests) of CRI's images.
	Images(ctx context.Context) ([]string, error)
	// Content reports whether the content store holds dgst, and its labels.
	Content(ctx context.Context, dgst digest.Digest) (labels map[string]string, found bool, err error)
	// DeleteContent deletes dgst from the content store; absent is no error.
	DeleteContent(ctx context.Context, dgst digest.Digest) error
	// Close ends the connection.
	Close() error
}

// dialContainerd connects to containerd at socket for one run: a fresh
// connection each time, since the last one may have died with a
// containerd restart, which is one of the times the canary runs.
func dialContainerd(socket string) func(ctx context.Context) (Node, error) {
	return func(ctx context.Context) (Node, error) {
		c, err := client.New(socket, client.WithDefaultNamespace(criNamespace), client.WithTimeout(dialTimeout))
		if err != nil {
			return nil, err
		}
		conn, ok := c.Conn().(*grpc.ClientConn)
		if !ok {
			c.Close()
			return nil, errors.New("containerd client has no gRPC connection")
		}
		return &containerdNode{c: c, cri: runtimeapi.NewImageServiceClient(conn)}, nil
	}
}

type containerdNode struct {
	c   *client.Client
	cri runtimeapi.ImageServiceClient
}

func (n *containerdNode) Version(ctx context.Context) (string, error) {
	v, err := n.c.Version(ctx)
	return v.Version, err
}

func (n *containerdNode) Pull(ctx context.Context, ref string) error {
	_, err := n.cri.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	return err
}

func (n *containerdNode) Remove(ctx context.Context, ref string) error {
	_, err := n.cri.RemoveImage(ctx, &runtimeapi.RemoveImageRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	return err
}

func (n *containerdNode) Images(ctx context.Context) ([]string, error) {
	resp, err := n.cri.ListImages(ctx, &runtimeapi.ListImagesRequest{})
	if err != nil {
		return nil, err
	}
	var names []string
	for _, im := range resp.GetImages() {
		names = append(names, im.GetRepoTags()...)
		names = append(names, im.GetRepoDigests()...)
	}
	return names, nil
}

func (n *containerdNode) Content(ctx context.Context, dgst digest.Digest) (map[string]string, bool, error) {
	info, err := n.c.ContentStore().Info(namespaces.WithNamespace(ctx, criNamespace), dgst)
	if errdefs.IsNotFound(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("content info %s: %w", dgst, err)
	}
	return info.Labels, true, nil
}

func (n *containerdNode) DeleteContent(ctx context.Context, dgst digest.Digest) error {
	err := n.c.ContentStore().Delete(namespaces.WithNamespace(ctx, criNamespace), dgst)
	if err != nil && !errdefs.IsNotFound(err) {
		return fmt.Errorf("deleting %s: %w", dgst, err)
	}
	return nil
}

func (n *containerdNode) Close() error { return n.c.Close() }
