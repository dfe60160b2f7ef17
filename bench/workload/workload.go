// Package workload describes what the benchmarks pull: image sizes and
// layer counts, and nodes emptied of an image between runs.
package workload

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// Spec is an image size and layer count, written "100MB/4".
type Spec struct {
	Name   string // "100MB-4layer"
	Size   int64
	Layers int
}

// ParseSpecs parses a comma-separated list such as "10MB/1,1GB/4".
func ParseSpecs(list string) ([]Spec, error) {
	var out []Spec
	for _, s := range strings.Split(list, ",") {
		s = strings.TrimSpace(s)
		size, layers, ok := strings.Cut(s, "/")
		n, err := parseSize(size)
		l, lerr := strconv.Atoi(layers)
		if !ok || err != nil || lerr != nil || l < 1 || n < int64(l) {
			return nil, fmt.Errorf("image spec %q: want SIZE/LAYERS such as 100MB/4 (sizes in KB, MB or GB)", s)
		}
		out = append(out, Spec{Name: size + "-" + layers + "layer", Size: n, Layers: l})
	}
	return out, nil
}

func parseSize(s string) (int64, error) {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"GB", 1_000_000_000}, {"MB", 1_000_000}, {"KB", 1_000}} {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			n, err := strconv.ParseInt(v, 10, 64)
			return n * u.mult, err
		}
	}
	return strconv.ParseInt(s, 10, 64)
}

// Purge removes the image from a node and waits until its layers have left
// the content store, so the next pull fetches every byte.
func Purge(ctx context.Context, n *cluster.Node, ref string, g *cluster.GeneratedImage) error {
	if _, found, err := n.ImageStatus(ctx, ref); err != nil {
		return err
	} else if found {
		if err := n.RemoveImage(ctx, ref); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, d := range g.LayerDigests() {
		for n.HasBlob(d) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%s still holds %s after removing %s", n.Name, d, ref)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return nil
}

// WaitAdvertised waits until the node's agent advertises at least n digests.
func WaitAdvertised(ctx context.Context, node *cluster.Node, n int) error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		s, err := node.Metrics(ctx)
		if err == nil && s.Sum("fleetmirror_advertised_keys", "type", "digest") >= float64(n) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s did not advertise %d digests within 15s", node.Name, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitPeers waits until every node's agent is connected to all the others,
// as on a cluster whose agents run long before a burst; agents that just
// started may serve alone for a while, and a burst then meets them apart.
func WaitPeers(ctx context.Context, nodes []*cluster.Node) error {
	deadline := time.Now().Add(30 * time.Second)
	for _, n := range nodes {
		for {
			s, err := n.Metrics(ctx)
			if err == nil && s.Sum("fleetmirror_peers") >= float64(len(nodes)-1) {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("%s is not connected to the other %d agents within 30s", n.Name, len(nodes)-1)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}
