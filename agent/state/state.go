// Package state keeps what the router advertises exactly in step with what
// the node's store holds.
package state

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/metrics"
	"github.com/fleetmirror/fleetmirror/agent/oci"
	"github.com/fleetmirror/fleetmirror/agent/policy"
	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store"
)

// Tracker advertises the store's keys and withdraws the ones that go.
type Tracker struct {
	Store   store.Store
	Router  routing.Router
	Metrics *metrics.Metrics
	Log     *slog.Logger
	// Registries limits tag keys to these registry hosts; empty means all.
	// Digests are always advertised: they name the same bytes everywhere.
	Registries []string
	// Policy keeps tag keys of private registries and upstream-only tags
	// unadvertised; nil advertises them all.
	Policy *policy.Policy
	// Retry is how soon keys that failed to advertise are tried again.
	Retry time.Duration

	mu   sync.Mutex
	held map[string]time.Time // key -> until
	wake chan struct{}
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
	if t.held == nil {
		t.held = map[string]time.Time{}
	}
	_, had := t.held[key]
	if !had && len(t.held) >= maxHeld {
		return
	}
	t.held[key] = time.Now().Add(HoldFor)
	if !had {
		select {
		case t.wakeup() <- struct{}{}:
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

func (t *Tracker) wakeup() chan struct{} {
	if t.wake == nil {
		t.wake = make(chan struct{}, 1)
	}
	return t.wake
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
	log := t.Log
	if log == nil {
		log = slog.Default()
	}
	retry := t.Retry
	if retry <= 0 {
		retry = 10 * time.Second
	}
	advertised := map[string]bool{}
	ticker := time.NewTicker(retry)
	defer ticker.Stop()
	t.mu.Lock()
	wake := t.wakeup()
	t.mu.Unlock()
	for {
		t.sync(ctx, log, advertised)
		select {
		case <-ctx.Done():
			return
		case <-t.Store.Changed():
		case <-wake:
		case <-ticker.C:
		}
	}
}

func (t *Tracker) sync(ctx context.Context, log *slog.Logger, advertised map[string]bool) {
	want := map[string]bool{}
	for _, k := range t.Store.Keys() {
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
		if err := t.Router.Withdraw(ctx, remove); err != nil {
			log.WarnContext(ctx, "withdrawing keys", "count", len(remove), "err", err)
		} else {
			for _, k := range remove {
				delete(advertised, k)
			}
		}
	}
	if len(add) > 0 {
		if err := t.Router.Advertise(ctx, add); err != nil {
			log.WarnContext(ctx, "advertising keys; will retry", "count", len(add), "err", err)
		} else {
			for _, k := range add {
				advertised[k] = true
			}
		}
	}
	if len(add)+len(remove) > 0 {
		log.InfoContext(ctx, "advertised keys changed", "added", len(add), "withdrawn", len(remove), "total", len(advertised))
	}
	if t.Metrics != nil {
		tags := 0
		for k := range advertised {
			if !oci.IsDigestKey(k) {
				tags++
			}
		}
		t.Metrics.AdvertisedKeys.WithLabelValues("tag").Set(float64(tags))
		t.Metrics.AdvertisedKeys.WithLabelValues("digest").Set(float64(len(advertised) - tags))
	}
}

func (t *Tracker) wanted(key string) bool {
	if !t.Policy.SharedKey(key) {
		return false
	}
	if oci.IsDigestKey(key) || len(t.Registries) == 0 {
		return true
	}
	reg := oci.RegistryOfKey(key)
	for _, r := range t.Registries {
		if r == reg {
			return true
		}
	}
	return false
}
