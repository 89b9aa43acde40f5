package agent

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/internal/metrics"
)

func newTestGate(limit int) (*gate, *metrics.Agent) {
	m := metrics.NewAgent()
	g := (&gates{metrics: m}).get("bitbucket")
	g.setLimit(limit)
	return g, m
}

// waitQueued waits until n requests wait at g.
func waitQueued(t *testing.T, g *gate, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if g.load("").Waiting == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("never %d waiting", n)
		}
		time.Sleep(time.Millisecond)
	}
}

// Past the limit requests wait and get in oldest first; a raised limit
// lets them in at once; a wait that runs out leaves no slot taken.
func TestGateOrderLimitAndTimeout(t *testing.T) {
	g, m := newTestGate(2)
	ctx := context.Background()
	for range 2 {
		if err := g.acquire(ctx, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	order := make(chan int, 3)
	for i := range 3 {
		go func() {
			if err := g.acquire(ctx, time.Minute); err != nil {
				t.Error(err)
			}
			order <- i
		}()
		waitQueued(t, g, i+1) // queued in this order
	}
	if got := testutil.ToFloat64(m.UpstreamWaiting.WithLabelValues("bitbucket")); got != 3 {
		t.Errorf("waiting gauge %v, want 3", got)
	}
	g.release()
	if i := <-order; i != 0 {
		t.Fatalf("first in: %d, want 0", i)
	}
	g.setLimit(4) // two more slots: both waiting get in (in order, though who reports first is the scheduler's)
	if got := (<-order) + (<-order); got != 1+2 {
		t.Fatalf("then: %d, want 1 and 2", got)
	}
	if busy := g.load("").InFlight; busy != 4 {
		t.Fatalf("busy %d, want 4", busy)
	}
	if got := testutil.ToFloat64(m.UpstreamInFlight.WithLabelValues("bitbucket")); got != 4 {
		t.Errorf("in-flight gauge %v, want 4", got)
	}

	// Full: a short wait ends in errGateTimeout and takes nothing.
	start := time.Now()
	if err := g.acquire(ctx, 50*time.Millisecond); !errors.Is(err, errGateTimeout) {
		t.Fatalf("full gate: %v", err)
	}
	if time.Since(start) < 50*time.Millisecond {
		t.Error("gave up before its wait")
	}
	// A request whose scanner leaves stops waiting at once.
	cctx, cancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() { errc <- g.acquire(cctx, time.Minute) }()
	waitQueued(t, g, 1)
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled wait: %v", err)
	}
	if l := g.load(""); l.InFlight != 4 || l.Waiting != 0 {
		t.Fatalf("after the waits ended: busy %d, waiting %d; want 4, 0", l.InFlight, l.Waiting)
	}
	for range 4 {
		g.release()
	}
	if busy := g.load("").InFlight; busy != 0 {
		t.Fatalf("busy %d after all released", busy)
	}
	if got := testutil.ToFloat64(m.UpstreamWaiting.WithLabelValues("bitbucket")) + testutil.ToFloat64(m.UpstreamInFlight.WithLabelValues("bitbucket")); got != 0 {
		t.Errorf("gauges left at %v", got)
	}
}

// No limit: nobody waits, however many.
func TestGateWithoutLimit(t *testing.T) {
	g, _ := newTestGate(0)
	for range 1000 {
		if err := g.acquire(context.Background(), time.Nanosecond); err != nil {
			t.Fatal(err)
		}
	}
	if busy := g.load("").InFlight; busy != 1000 {
		t.Fatalf("busy %d", busy)
	}
}

// Slots are never lost or doubled when releases race with waits that
// run out (the slot given just as the wait ended is passed on).
func TestGateUnderChurn(t *testing.T) {
	g, _ := newTestGate(3)
	done := make(chan struct{})
	for i := range 16 {
		go func() {
			defer func() { done <- struct{}{} }()
			for j := range 200 {
				wait := time.Duration((i+j)%3) * 50 * time.Microsecond
				if g.acquire(context.Background(), wait) == nil {
					if busy := g.load("").InFlight; busy > 3 {
						t.Errorf("busy %d over the limit", busy)
					}
					g.release()
				}
			}
		}()
	}
	for range 16 {
		<-done
	}
	if l := g.load(""); l.InFlight != 0 || l.Waiting != 0 {
		t.Fatalf("after churn: busy %d, waiting %d", l.InFlight, l.Waiting)
	}
}
