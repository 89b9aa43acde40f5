package agent

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ferry-tunnel/ferry/internal/metrics"
)

// gate bounds the requests in flight to one upstream
// (upstreams[].max_concurrent_requests). Requests past the limit wait
// in arrival order. It outlives reloads, which only change its limit, so
// requests in flight across a reload still count.
type gate struct {
	inFlight, waiting prometheus.Gauge
	refused           prometheus.Counter

	mu       sync.Mutex
	limit    int // 0: none
	busy     int
	queue    []chan struct{} // waiting, oldest first; closed when given a slot
	refusedN int64           // waits that ran out, since start
}

// setLimit changes the limit; a higher one lets waiting requests in.
func (g *gate) setLimit(n int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.limit = n
	g.admitLocked()
}

// acquire takes a slot, waiting for one at most wait, and less if ctx
// ends first. Every nil return must be followed by one release.
func (g *gate) acquire(ctx context.Context, wait time.Duration) error {
	g.mu.Lock()
	if g.limit == 0 || (g.busy < g.limit && len(g.queue) == 0) {
		g.busy++
		g.mu.Unlock()
		g.inFlight.Inc()
		return nil
	}
	ch := make(chan struct{})
	g.queue = append(g.queue, ch)
	g.mu.Unlock()
	g.waiting.Inc()
	defer g.waiting.Dec()
	t := time.NewTimer(wait)
	defer t.Stop()
	var err error
	select {
	case <-ch:
		g.inFlight.Inc()
		return nil
	case <-ctx.Done():
		err = ctx.Err()
	case <-t.C:
		err = errGateTimeout
	}
	g.mu.Lock()
	i := slices.Index(g.queue, ch)
	if i < 0 {
		// Given a slot just as the wait ended: take it, unless the
		// request is gone, then pass it on.
		g.mu.Unlock()
		g.inFlight.Inc()
		if ctx.Err() != nil {
			g.release()
			return ctx.Err()
		}
		return nil
	}
	g.queue = slices.Delete(g.queue, i, i+1)
	if err == errGateTimeout {
		g.refusedN++
		g.refused.Inc()
	}
	g.mu.Unlock()
	return err
}

// errGateTimeout: no slot came free within the wait.
var errGateTimeout = errors.New("no slot came free in time")

// release gives a slot back, to the oldest waiting request if any.
func (g *gate) release() {
	g.inFlight.Dec()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.busy--
	g.admitLocked()
}

func (g *gate) admitLocked() {
	for len(g.queue) > 0 && (g.limit == 0 || g.busy < g.limit) {
		ch := g.queue[0]
		g.queue = g.queue[1:]
		g.busy++
		close(ch)
	}
}

// UpstreamLoad is what one upstream carries now, in /v1/status.
type UpstreamLoad struct {
	Upstream string `json:"upstream"`
	InFlight int    `json:"in_flight"`
	Limit    int    `json:"max_concurrent_requests"` // 0: none
	Waiting  int    `json:"waiting"`
	Refused  int64  `json:"refused_busy"` // 503 upstream_busy since start
}

// load reports the gate's state: the limit, the requests holding a slot
// and those waiting.
func (g *gate) load(name string) UpstreamLoad {
	g.mu.Lock()
	defer g.mu.Unlock()
	return UpstreamLoad{Upstream: name, InFlight: g.busy, Limit: g.limit, Waiting: len(g.queue), Refused: g.refusedN}
}

// gates holds one gate per upstream name, across reloads.
type gates struct {
	metrics *metrics.Agent

	mu sync.Mutex
	m  map[string]*gate
}

// get returns the named upstream's gate (its limit is set by
// upstreamSet.applyLimits).
func (gs *gates) get(name string) *gate {
	gs.mu.Lock()
	defer gs.mu.Unlock()
	g := gs.m[name]
	if g == nil {
		if gs.m == nil {
			gs.m = map[string]*gate{}
		}
		g = &gate{inFlight: gs.metrics.UpstreamInFlight.WithLabelValues(name), waiting: gs.metrics.UpstreamWaiting.WithLabelValues(name),
			refused: gs.metrics.UpstreamBusy.WithLabelValues(name)}
		gs.m[name] = g
	}
	return g
}
