// Package gctune sets the garbage collector's target (GOGC) from the live
// heap after every collection, so that a daemon keeps little spare heap
// when its heap is large and collects rarely when it is small.
//
// GOGC alone cannot do both. With the default of 100 the heap may grow to
// twice what is live before the next collection: a relay holding
// thousands of idle agents keeps that much again as spare, which is most
// of what an idle agent costs it beyond the libraries' buffers. A lower
// GOGC trims that, but a small heap (one agent's; a relay's with a few
// agents) is then collected every few hundred requests, and on a loaded
// machine collections set most of a request's tail latency. So the spare
// heap is a share of the live heap (Policy.Percent) but never less than
// Policy.Floor bytes.
//
// An operator's GOGC in the environment wins: Start then changes nothing.
// GOMEMLIMIT, if set, still caps the heap as usual.
package gctune

import (
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
)

// Policy is how much spare heap a program keeps.
type Policy struct {
	// Percent is the spare heap as a share of the live heap, in percent
	// (GOGC's unit), once the live heap is large.
	Percent int
	// Floor is the least spare heap, in bytes: while Percent of the live
	// heap is less, GOGC is raised to give Floor.
	Floor uint64
}

// ForRelay keeps half the live heap spare, at least 16 MiB: a relay's
// heap is mostly idle agents' connections, which allocate nothing, and
// its memory per agent is what sizes its host.
func ForRelay() Policy { return Policy{Percent: 50, Floor: 16 << 20} }

// ForAgent keeps the runtime's default share, at least 8 MiB: an agent's
// heap is small (its buffers for bulk transfers are pooled) and what
// counts is the CPU and latency of every request, but its peak RSS during
// bulk transfers is what sizes the broker VM (16 MiB raised it from 38 to
// 49 MiB over a download and an upload; 8 MiB kept it at 40).
func ForAgent() Policy { return Policy{Percent: 100, Floor: 8 << 20} }

// heapMinimum is the runtime's least heap target at GOGC=100; it scales
// with GOGC, so a GOGC raised for a small heap must not raise it past the
// target wanted.
const heapMinimum = 4 << 20

// For is the GOGC that gives policy p's spare heap over live bytes: the
// runtime then collects when the heap reaches live plus the larger of
// Percent of live and Floor. (Before the first collection live reads 0:
// the target is Floor.)
func (p Policy) For(live uint64) int {
	l := float64(live)
	target := l + max(l*float64(p.Percent)/100, float64(p.Floor))
	gogc := float64(p.Percent)
	if live > 0 {
		gogc = max(gogc, math.Ceil(float64(p.Floor)*100/l))
	}
	// The runtime's minimum, heapMinimum*GOGC/100, must stay within the
	// target: this also sets GOGC when live is 0.
	if bound := math.Floor(target * 100 / heapMinimum); live == 0 || gogc > bound {
		gogc = bound
	}
	return int(max(gogc, float64(p.Percent)))
}

// Tuner applies a Policy after every collection until stopped.
type Tuner struct {
	policy  Policy
	prev    int // GOGC before Start, restored by Stop
	stopped atomic.Bool

	mu      sync.Mutex // held by adjust: the finalizer's goroutine, or Start's
	percent int
	sample  []metrics.Sample
}

// Start applies p now and after every collection, unless GOGC is set in
// the environment (then it returns nil: the operator's setting stands).
// Stop the returned Tuner to restore the previous GOGC.
func Start(p Policy) *Tuner {
	if os.Getenv("GOGC") != "" {
		return nil
	}
	t := &Tuner{policy: p, sample: []metrics.Sample{{Name: "/gc/heap/live:bytes"}}}
	t.prev = debug.SetGCPercent(p.Percent)
	t.percent = p.Percent
	t.adjust()
	arm(t)
	return t
}

// Stop ends the adjustments and restores the GOGC found at Start. A nil
// Tuner (GOGC was set) is a no-op.
func (t *Tuner) Stop() {
	if t == nil || t.stopped.Swap(true) {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	debug.SetGCPercent(t.prev)
}

// Percent is the GOGC the tuner last set.
func (t *Tuner) Percent() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.percent
}

// adjust sets GOGC for the live heap the last collection found. Changes
// under a tenth are skipped: each costs the runtime a recomputation of its
// pacing, and the live heap moves a little on every cycle.
func (t *Tuner) adjust() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.stopped.Load() {
		return
	}
	metrics.Read(t.sample)
	want := t.policy.For(t.sample[0].Value.Uint64())
	if d := want - t.percent; d*10 > t.percent || -d*10 > t.percent {
		debug.SetGCPercent(want)
		t.percent = want
	}
}

// sentinel is an object nothing refers to, whose finalizer runs after
// each collection: it adjusts GOGC and sets itself again, until the tuner
// stops. This costs nothing while the program allocates nothing (no
// collection, no call), unlike polling.
type sentinel struct{ t *Tuner }

func arm(t *Tuner) { runtime.SetFinalizer(&sentinel{t: t}, afterGC) }

func afterGC(s *sentinel) {
	if s.t.stopped.Load() {
		return
	}
	s.t.adjust()
	runtime.SetFinalizer(s, afterGC)
}
