// Package advertise keeps what the router advertises exactly in step with
// what the node's store holds, plus the blobs held in flight.
package advertise

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/policy"
)

// Store is what the tracker reads of the content store.
type Store interface {
	// Keys lists the keys to advertise.
	Keys() []string
	// Changed is signalled when Keys may have changed.
	Changed() <-chan struct{}
}

// Router is what the tracker tells the network.
type Router interface {
	Advertise(ctx context.Context, keys []string) error
	Withdraw(ctx context.Context, keys []string) error
}

// Tracker advertises the store's keys and withdraws the ones that go.
type Tracker struct {
	store   Store
	router  Router
	metrics *metrics.Metrics
	log     *slog.Logger
	// registries limits tag keys to these registry hosts; empty means all.
	// Digests are always advertised: they name the same bytes everywhere.
	registries []string
	// policy keeps tag keys of private registries and upstream-only tags
	// unadvertised; nil advertises them all.
	policy *policy.Policy
	// retry is how soon keys that failed to advertise are tried again.
	retry time.Duration

	mu   sync.Mutex
	held map[string]time.Time // key -> until
	wake chan struct{}
}

// Option sets an optional setting of a Tracker.
type Option func(*Tracker)

// WithMetrics reports the advertised keys to m.
func WithMetrics(m *metrics.Metrics) Option { return func(t *Tracker) { t.metrics = m } }

// WithLogger sets the logger; the default is slog.Default().
func WithLogger(l *slog.Logger) Option { return func(t *Tracker) { t.log = l } }

// WithRegistries limits tag keys to these registry hosts; without it (or
// with none) tags of every registry are advertised. Digests are always
// advertised: they name the same bytes everywhere.
func WithRegistries(hosts []string) Option { return func(t *Tracker) { t.registries = hosts } }

// WithPolicy keeps tag keys of private registries and upstream-only tags
// unadvertised; without it they are all advertised.
func WithPolicy(p *policy.Policy) Option { return func(t *Tracker) { t.policy = p } }

// WithRetry sets how soon keys that failed to advertise are tried again;
// the default is 10s.
func WithRetry(d time.Duration) Option { return func(t *Tracker) { t.retry = d } }

// New returns a Tracker that advertises st's keys on r; Run starts it.
func New(st Store, r Router, opts ...Option) (*Tracker, error) {
	t := &Tracker{store: st, router: r, log: slog.Default(), retry: 10 * time.Second,
		held: map[string]time.Time{}, wake: make(chan struct{}, 1)}
	for _, o := range opts {
		o(t)
	}
	var missing []string
	if st == nil {
		missing = append(missing, "store")
	}
	if r == nil {
		missing = append(missing, "router")
	}
	if len(missing) > 0 {
		return nil, errors.New("advertise: missing required argument(s): " + strings.Join(missing, ", "))
	}
	if t.retry <= 0 {
		return nil, fmt.Errorf("advertise: retry must be positive, got %s", t.retry)
	}
	if t.log == nil {
		t.log = slog.Default()
	}
	return t, nil
}

// HoldFor is how long a key held in flight stays advertised without the
// store listing it: long enough for a pull of many large layers to finish
// and its image to be recorded, after which the store's keys take over.
const HoldFor = 10 * time.Minute

// maxHeld bounds the keys held in flight at once: far more blobs than
// pulls in progress on a node, and a cap on what requests can make it
// advertise.
const maxHeld = 4096

// Hold advertises key now, though the store does not list it: a blob this
// node's containerd is fetching, which peers can stream as it grows.
func (t *Tracker) Hold(key string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, had := t.held[key]
	if !had && len(t.held) >= maxHeld {
		return
	}
	t.held[key] = time.Now().Add(HoldFor)
	if !had {
		select {
		case t.wake <- struct{}{}:
		default:
		}
	}
}

// Holding reports whether key is held in flight.
func (t *Tracker) Holding(key string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	until, ok := t.held[key]
	return ok && time.Now().Before(until)
}

// heldKeys returns the keys held in flight, forgetting expired ones.
func (t *Tracker) heldKeys() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var keys []string
	now := time.Now()
	for k, until := range t.held {
		if now.After(until) {
			delete(t.held, k)
			continue
		}
		keys = append(keys, k)
	}
	return keys
}

// Run follows the store until ctx is done.
func (t *Tracker) Run(ctx context.Context) {
	advertised := map[string]bool{}
	ticker := time.NewTicker(t.retry)
	defer ticker.Stop()
	for {
		t.sync(ctx, advertised)
		select {
		case <-ctx.Done():
			return
		case <-t.store.Changed():
		case <-t.wake:
		case <-ticker.C:
		}
	}
}

func (t *Tracker) sync(ctx context.Context, advertised map[string]bool) {
	want := map[string]bool{}
	for _, k := range t.store.Keys() {
		if t.wanted(k) {
			want[k] = true
		}
	}
	for _, k := range t.heldKeys() {
		want[k] = true
	}
	var add, remove []string
	for k := range want {
		if !advertised[k] {
			add = append(add, k)
		}
	}
	for k := range advertised {
		if !want[k] {
			remove = append(remove, k)
		}
	}
	if len(remove) > 0 {
		if err := t.router.Withdraw(ctx, remove); err != nil {
			t.log.WarnContext(ctx, "withdrawing keys", "count", len(remove), "err", err)
		} else {
			for _, k := range remove {
				delete(advertised, k)
			}
		}
	}
	if len(add) > 0 {
		if err := t.router.Advertise(ctx, add); err != nil {
			t.log.WarnContext(ctx, "advertising keys; will retry", "count", len(add), "err", err)
		} else {
			for _, k := range add {
				advertised[k] = true
			}
		}
	}
	if len(add)+len(remove) > 0 {
		t.log.InfoContext(ctx, "advertised keys changed", "added", len(add), "withdrawn", len(remove), "total", len(advertised))
	}
	if t.metrics != nil {
		tags := 0
		for k := range advertised {
			if !oci.IsDigestKey(k) {
				tags++
			}
		}
		t.metrics.AdvertisedKeys.WithLabelValues("tag").Set(float64(tags))
		t.metrics.AdvertisedKeys.WithLabelValues("digest").Set(float64(len(advertised) - tags))
	}
}

func (t *Tracker) wanted(key string) bool {
	if !t.policy.SharedKey(key) {
		return false
	}
	if oci.IsDigestKey(key) || len(t.registries) == 0 {
		return true
	}
	reg := oci.RegistryOfKey(key)
	for _, r := range t.registries {
		if r == reg {
			return true
		}
	}
	return false
}
