// Package nodetaint is node readiness's fallback for when the operator is
// gone: the agent removes the operator's startup taint from its own node
// once the node is older than a bound, so no node is held for good, and
// says so on the node (ReleasedAnnotation).
//
// It talks to the API server with the pod's bound service account token.
// From Kubernetes 1.30 such a token carries the node the pod runs on
// (userInfo.extra authentication.kubernetes.io/node-name); the operator
// chart's ValidatingAdmissionPolicy lets the agent's account change only
// that node, and on it only remove this taint. RBAC alone (get and patch
// on nodes) would let it change every node.
package nodetaint

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"
)

// TaintKey is the operator's startup taint (operator/readiness.TaintKey).
const TaintKey = "fleetmirror.dev/agent-not-ready"

// ReleasedAnnotation records on the node that its agent released it: the
// time, then why. It is where people look (kubectl describe node) when
// the operator, which releases with an event, was not there to tell.
const ReleasedAnnotation = "fleetmirror.dev/released-by-agent"

// In-cluster defaults: the pod's service account files.
const (
	DefaultTokenFile = "/var/run/secrets/kubernetes.io/serviceaccount/token"
	DefaultCAFile    = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
)

// Releaser removes the startup taint from one node past a bound.
type Releaser struct {
	node  string        // the agent's own node (downward API spec.nodeName)
	after time.Duration // the bound, from the node's creation
	// The API server's URL and its credentials (the token is read again
	// on every call: the kubelet rotates it).
	api, tokenFile, caFile string
	period                 time.Duration // between checks while the bound is not reached
	log                    *slog.Logger

	client *http.Client
}

// Option configures a Releaser.
type Option func(*Releaser)

// WithPeriod sets the time between checks while the bound is not reached
// (30s by default).
func WithPeriod(d time.Duration) Option { return func(r *Releaser) { r.period = d } }

// WithLogger sets the logger.
func WithLogger(l *slog.Logger) Option { return func(r *Releaser) { r.log = l } }

// New returns a Releaser for node, to release once it is older than after,
// through the API server at api with the pod's token and CA files.
func New(node string, after time.Duration, api, tokenFile, caFile string, opts ...Option) (*Releaser, error) {
	if node == "" || after <= 0 || api == "" {
		return nil, errors.New("nodetaint: node name, bound and API server are required")
	}
	r := &Releaser{node: node, after: after, api: api, tokenFile: tokenFile, caFile: caFile, period: 30 * time.Second, log: slog.Default()}
	for _, o := range opts {
		o(r)
	}
	if r.period <= 0 {
		return nil, fmt.Errorf("nodetaint: period must be positive, got %s", r.period)
	}
	return r, nil
}

// InClusterAPI is the API server's URL from the pod's environment.
func InClusterAPI() string {
	h, p := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if h == "" || p == "" {
		return ""
	}
	return "https://" + net.JoinHostPort(h, p)
}

// Run checks the node until it is past the bound without the taint (then
// nothing can hold it any more: the operator never taints a node past the
// bound), removing the taint when it finds it there. It returns when done
// or when ctx ends; failures are logged and retried.
func (r *Releaser) Run(ctx context.Context) {
	for {
		wait, err := r.Check(ctx)
		if err != nil {
			r.log.Warn("checking the node's startup taint", "node", r.node, "err", err.Error())
			wait = r.period
		}
		if wait == 0 {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(min(wait, r.period)):
		}
	}
}

type node struct {
	Metadata struct {
		ResourceVersion   string            `json:"resourceVersion"`
		CreationTimestamp time.Time         `json:"creationTimestamp"`
		Annotations       map[string]string `json:"annotations"`
	} `json:"metadata"`
	Spec struct {
		Taints []map[string]any `json:"taints"`
	} `json:"spec"`
}

// Check reads the node once and removes the taint if the node is past the
// bound. It returns how long to wait before the next check, 0 when none
// is needed.
func (r *Releaser) Check(ctx context.Context) (time.Duration, error) {
	var n node
	if err := r.do(ctx, http.MethodGet, "", nil, &n); err != nil {
		return 0, err
	}
	age := time.Since(n.Metadata.CreationTimestamp)
	var keep []map[string]any
	for _, t := range n.Spec.Taints {
		if t["key"] != TaintKey {
			keep = append(keep, t)
		}
	}
	tainted := len(keep) != len(n.Spec.Taints)
	switch {
	case age < r.after:
		return r.after - age, nil
	case !tainted:
		return 0, nil
	}
	// Only if nothing changed since the read: the admission policy checks
	// that only this taint goes (and only ReleasedAnnotation comes), and a
	// stale list would put others back.
	patch := []map[string]any{{"op": "test", "path": "/metadata/resourceVersion", "value": n.Metadata.ResourceVersion}}
	if len(keep) == 0 {
		patch = append(patch, map[string]any{"op": "remove", "path": "/spec/taints"})
	} else {
		patch = append(patch, map[string]any{"op": "replace", "path": "/spec/taints", "value": keep})
	}
	why := fmt.Sprintf("%s released by its agent: held %s, past the bound of %s, and the operator, which releases held nodes with an event, did not (is it running?)",
		time.Now().UTC().Format(time.RFC3339), age.Round(time.Second), r.after)
	if n.Metadata.Annotations == nil {
		patch = append(patch, map[string]any{"op": "add", "path": "/metadata/annotations", "value": map[string]string{ReleasedAnnotation: why}})
	} else {
		// JSON pointer: "/" in the key is "~1".
		patch = append(patch, map[string]any{"op": "add", "path": "/metadata/annotations/" + strings.ReplaceAll(ReleasedAnnotation, "/", "~1"), "value": why})
	}
	body, err := json.Marshal(patch)
	if err != nil {
		return 0, err
	}
	if err := r.do(ctx, http.MethodPatch, "application/json-patch+json", body, nil); err != nil {
		return 0, fmt.Errorf("removing the startup taint: %w", err)
	}
	r.log.Warn("removed the startup taint from this node: it was held past the bound, and the operator, which releases it with an event, did not (is it running?)",
		"node", r.node, "taint", TaintKey, "after", r.after.String(), "age", age.Round(time.Second).String())
	return 0, nil
}

func (r *Releaser) do(ctx context.Context, method, contentType string, body []byte, out any) error {
	if r.client == nil {
		c, err := r.httpClient()
		if err != nil {
			return err
		}
		r.client = c
	}
	tok, err := os.ReadFile(r.tokenFile)
	if err != nil {
		return fmt.Errorf("service account token: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, method, strings.TrimRight(r.api, "/")+"/api/v1/nodes/"+url.PathEscape(r.node), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+string(bytes.TrimSpace(tok)))
	req.Header.Set("Accept", "application/json")
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := r.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode/100 != 2 {
		var st struct {
			Message string `json:"message"`
		}
		_ = json.Unmarshal(b, &st)
		return fmt.Errorf("%s node %s: %s: %s", method, r.node, resp.Status, st.Message)
	}
	if out != nil {
		return json.Unmarshal(b, out)
	}
	return nil
}

func (r *Releaser) httpClient() (*http.Client, error) {
	pem, err := os.ReadFile(r.caFile)
	if err != nil {
		return nil, fmt.Errorf("API server CA: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("API server CA %s: no certificate", r.caFile)
	}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12},
		Proxy:           nil,
	}}, nil
}
