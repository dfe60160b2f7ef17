package e2e

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/peerproto"
	"github.com/fleetmirror/fleetmirror/test/cluster"
)

// TestTrust: only the cluster's own agents take part. Nodes 1-3 are
// members; node 4 runs an agent with another key and node 5 one with
// none, each in its own network namespace with its own libp2p host.
func TestTrust(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("the e2e suite needs root for network namespaces")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := startCluster(t, ctx, cluster.Options{Nodes: 5, Containerd: cluster.Containerd2, Logf: t.Logf,
		MirrorAlt: true,
		AgentArgs: []string{"--private-registries=" + privateHost, "--upstream-tags=:latest"}})
	c.Node(4).KeyFile = filepath.Join(c.Dir, "stranger.key")
	if err := cluster.WriteNetworkKey(c.Node(4).KeyFile); err != nil {
		t.Fatal(err)
	}
	c.Node(5).KeyFile = "none"
	for _, n := range c.Nodes {
		n.AgentBin = agentBin(t)
	}
	if err := c.StartAgents(ctx); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, ctx: ctx, c: c}
	t.Run("a/strangers cannot join, and their tag changes no pull", e.strangersCannotJoin)
	t.Run("b/strangers get 403; the node's containerd and peers are served", e.strangersGet403)
	t.Run("c/a private registry stays off the peer network", e.privateRegistry)
	t.Run("upstream-only tags resolve upstream, their blobs still come from peers", e.upstreamTags)
}

// privateHost is the upstream under its second name (cluster.AltHost).
const privateHost = "127.0.0.1:5001"

func (e *env) strangersCannotJoin(t *testing.T) {
	n1, s4, s5 := e.c.Node(1), e.c.Node(4), e.c.Node(5)
	// The strangers hold an image under a tag that upstream then moves
	// to the real image: believing them would run their image.
	fake := e.image(21, 8<<20, 2, "trust/app:v1")
	for _, s := range []*cluster.Node{s4, s5} {
		e.pull(t, s, fake.ref, fake)
		e.waitAdvertised(t, s, fake)
	}
	real := e.image(22, 8<<20, 2, "trust/app:v1")
	e.c.Upstream.Reset()
	e.pull(t, n1, real.ref, real)
	if d, err := n1.ImageDigest(e.ctx, real.ref); err != nil || d != real.Manifest.Digest {
		t.Errorf("node 1 runs %s under %s (err %v), want the registry's %s", d, real.ref, err, real.Manifest.Digest)
	}
	st := e.c.Upstream.Stats()
	if got := st.FromClient(n1.IP, "GET", "blob").Requests; got != int64(len(real.Layers))+1 {
		t.Errorf("node 1 fetched %d blobs upstream, want all %d (layers and config): nobody else holds them", got, len(real.Layers)+1)
	}
	for _, n := range e.c.Nodes {
		peers := e.metrics(t, n).Sum("fleetmirror_peers")
		want := 2.0 // the other members
		if n == s4 || n == s5 {
			want = 0
		}
		if peers != want {
			t.Errorf("%s is connected to %v peers, want %v", n.Name, peers, want)
		}
	}
}

func (e *env) strangersGet403(t *testing.T) {
	n1, n2, s4 := e.c.Node(1), e.c.Node(2), e.c.Node(4)
	img := e.image(23, 8<<20, 2, "trust/private:v1")
	e.pull(t, n1, img.ref, img)
	e.waitAdvertised(t, n1, img)
	manifest := "http://" + n1.RegistryAddr() + "/v2/trust/private/manifests/v1?ns=" + e.c.Upstream.Host()
	blob := "http://" + n1.RegistryAddr() + "/v2/any/name/blobs/" + img.Layers[0].Digest.String()
	before := e.metrics(t, n1).Sum("fleetmirror_registry_denied_total")
	get := func(client *http.Client, url string, header string) (int, string) {
		req, _ := http.NewRequestWithContext(e.ctx, http.MethodGet, url, nil)
		if header != "" {
			req.Header.Set(peerproto.PeerHeader, header)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("GET %s: %v", url, err)
		}
		defer resp.Body.Close()
		b := make([]byte, 512)
		k, _ := resp.Body.Read(b)
		return resp.StatusCode, string(b[:k])
	}
	requests := 0
	for _, from := range []struct {
		name   string
		client *http.Client
	}{{"the pod network (the bridge)", http.DefaultClient}, {"another node's address", s4.LocalClient()}} {
		for _, url := range []string{manifest, blob} {
			for _, header := range []string{"", "1"} {
				requests++
				status, body := get(from.client, url, header)
				if status != http.StatusForbidden || !strings.Contains(body, "DENIED") {
					t.Errorf("from %s, GET %s (peer header %q): %d %s, want 403 DENIED", from.name, url, header, status, body)
				}
			}
		}
	}
	if got := e.metrics(t, n1).Sum("fleetmirror_registry_denied_total") - before; got != float64(requests) {
		t.Errorf("%v refusals counted, want %d", got, requests)
	}
	// The node's own containerd's path answers, and peers serve each other.
	// The store indexes the tag a moment after the pull's blobs.
	local := n1.LocalRegistryURL() + "/v2/trust/private/manifests/v1?ns=" + e.c.Upstream.Host()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		status, body := get(n1.LocalClient(), local, "")
		if status == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("node 1 asking its own agent: %d %s, want 200", status, body)
			break
		}
	}
	e.c.Upstream.Reset()
	e.pull(t, n2, img.ref, img)
	if got := e.c.Upstream.Stats().FromClient(n2.IP, "GET", "blob").Requests; got != 0 {
		t.Errorf("node 2 fetched %d blobs upstream; node 1, a member, holds them", got)
	}
}

func (e *env) privateRegistry(t *testing.T) {
	n1, n2 := e.c.Node(1), e.c.Node(2)
	img := e.image(24, 8<<20, 2, "trust/secret:v1")
	ref := privateHost + "/trust/secret:v1"
	advertised := func() float64 { return e.metrics(t, n1).Sum("fleetmirror_advertised_keys") }
	before := advertised()
	e.pull(t, n1, ref, img)
	// Long enough for the store and tracker to follow a pull (they react
	// within milliseconds); a leak shows as a rise in the count.
	deadline := time.Now().Add(3 * time.Second)
	for time.Now().Before(deadline) {
		if got := advertised(); got != before {
			t.Fatalf("node 1 advertises %v keys after pulling a private registry's image, %v before", got, before)
		}
		time.Sleep(200 * time.Millisecond)
	}
	e.c.Upstream.Reset()
	e.pull(t, n2, ref, img)
	if got := e.c.Upstream.Stats().FromClient(n2.IP, "GET", "blob").Requests; got != int64(len(img.Layers))+1 {
		t.Errorf("node 2 fetched %d blobs of the private image upstream, want all %d", got, len(img.Layers)+1)
	}
	if got := e.metrics(t, n2).Sum("fleetmirror_mirror_requests_total", "registry", privateHost, "outcome", "peer"); got != 0 {
		t.Errorf("node 2's agent served %v requests of the private registry from peers", got)
	}
}

func (e *env) upstreamTags(t *testing.T) {
	n1, n2 := e.c.Node(1), e.c.Node(2)
	img := e.image(25, 8<<20, 2, "trust/moving:latest")
	e.pull(t, n1, img.ref, img)
	e.waitAdvertised(t, n1, img)
	e.c.Upstream.Reset()
	e.pull(t, n2, img.ref, img)
	st := e.c.Upstream.Stats()
	if got := st.FromClient(n2.IP, "GET", "manifest").Requests + st.FromClient(n2.IP, "HEAD", "manifest").Requests; got == 0 {
		t.Error("node 2 resolved a :latest tag without asking the registry")
	}
	if got := st.FromClient(n2.IP, "GET", "blob").Requests; got != 0 {
		t.Errorf("node 2 fetched %d blobs upstream; their digests are shared", got)
	}
}
