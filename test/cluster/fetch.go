package cluster

import (
	"context"
	"fmt"
	"net/http"
	"strings"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/platforms"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// FetchAllPlatforms has the node's containerd fetch ref from the upstream,
// every platform of an index and nothing unpacked, into namespace k8s.io
// (the agent's), as `ctr images fetch --all-platforms` does. A CRI pull
// fetches only the node's platform; clients that copy a whole index need
// the rest.
func (n *Node) FetchAllPlatforms(ctx context.Context, ref string) error {
	cl, err := client.New(n.Socket, client.WithDefaultNamespace("k8s.io"))
	if err != nil {
		return fmt.Errorf("%s: containerd client: %w", n.Name, err)
	}
	defer cl.Close()
	// Straight to the upstream, plain HTTP; never through a proxy.
	hc := &http.Client{Transport: &http.Transport{}}
	resolver := docker.NewResolver(docker.ResolverOptions{
		Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts), docker.WithClient(hc)),
	})
	if _, err := cl.Fetch(ctx, ref, client.WithResolver(resolver), client.WithPlatformMatcher(platforms.All)); err != nil {
		return fmt.Errorf("%s: fetch %s: %w", n.Name, ref, err)
	}
	n.logf("fetched %s, all platforms", ref)
	return nil
}

// PushIndex uploads an index (or Docker manifest list) with all its
// images under ref ("IP:5000/repo:tag" or "repo:tag"), like Push.
func (u *Upstream) PushIndex(ctx context.Context, ref string, idx v1.ImageIndex) error {
	if !strings.HasPrefix(ref, u.Host()+"/") {
		ref = u.Ref(ref)
	}
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("push: %w", err)
	}
	if err := remote.WriteIndex(r, idx, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	return nil
}
