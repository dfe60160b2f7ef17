package advertise

import (
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/fleetmirror/fleetmirror/agent/routing"
	"github.com/fleetmirror/fleetmirror/agent/store/storetest"
)

func TestNewMissingRequired(t *testing.T) {
	_, err := New(nil, nil)
	if err == nil || !strings.Contains(err.Error(), "store") || !strings.Contains(err.Error(), "router") {
		t.Fatalf("err = %v, want one naming the store and the router", err)
	}
}

// A key held in flight is advertised though the store does not list it,
// and stays advertised when the store changes; the store's keys are
// advertised and withdrawn as before.
func TestHoldAdvertisesInFlight(t *testing.T) {
	rs := routing.NewMemory(netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:1"))
	st := storetest.NewMemory()
	tr, err := New(st, rs[0], WithRetry(20*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go tr.Run(ctx)

	found := func(key string) bool {
		ch, _ := rs[1].Lookup(ctx, key, 1)
		_, ok := <-ch
		return ok
	}
	waitUntil := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(5 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: not within 5s", what)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	const inFlight = "sha256:6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
	if tr.Holding(inFlight) {
		t.Fatal("holding a key before Hold")
	}
	tr.Hold(inFlight)
	if !tr.Holding(inFlight) {
		t.Fatal("not holding a key after Hold")
	}
	waitUntil("the held key is advertised", func() bool { return found(inFlight) })

	d := st.Add("application/octet-stream", []byte("layer"))
	waitUntil("the store's key is advertised", func() bool { return found(d.String()) })
	if !found(inFlight) {
		t.Error("a store change withdrew the key held in flight")
	}
}
