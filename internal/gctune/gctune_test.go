package gctune

import (
	"runtime"
	"runtime/metrics"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// target is where the runtime collects next at GOGC g over live bytes:
// the larger of live grown by g percent and the minimum heap scaled by g.
func target(live uint64, g int) float64 {
	return max(float64(live)*(1+float64(g)/100), float64(heapMinimum)*float64(g)/100)
}

func TestPolicySetsTheSpareHeap(t *testing.T) {
	p := Policy{Percent: 50, Floor: 16 << 20}
	for _, c := range []struct {
		live uint64
		gogc int
	}{
		{0, 400},         // nothing collected yet: collect at the floor, 16 MiB
		{512 << 10, 412}, // tiny heap: live + 16 MiB, held by the runtime's minimum
		{3 << 20, 475},   // the same
		{4 << 20, 400},   // live + 16 MiB
		{10 << 20, 160},  // live + 16 MiB
		{24 << 20, 67},   // live + 16 MiB, rounded up
		{31 << 20, 52},   // just under the crossover
		{32 << 20, 50},   // the crossover: half of 32 MiB is the floor
		{85 << 20, 50},   // large heap: half of live spare
		{1 << 30, 50},    // and no less for a larger one
	} {
		if got := p.For(c.live); got != c.gogc {
			t.Errorf("live %d KiB: GOGC %d, want %d", c.live>>10, got, c.gogc)
		}
	}
	// Whatever the live heap, the runtime then collects at live plus the
	// larger of half of live and the floor, give or take rounding.
	for live := uint64(0); live < 1<<30; live += 997 << 10 {
		want := float64(live) + max(float64(live)/2, float64(p.Floor))
		if got := target(live, p.For(live)); got < want*0.98 || got > want*1.02 {
			t.Fatalf("live %d KiB: collects at %.0f KiB, want %.0f", live>>10, got/1024, want/1024)
		}
	}
}

// gogc is the GOGC the runtime is using.
func gogc() int {
	s := []metrics.Sample{{Name: "/gc/gogc:percent"}}
	metrics.Read(s)
	return int(s[0].Value.Uint64())
}

// collectUntil runs collections (each lets the tuner's finalizer run)
// until ok or about 5 s have passed.
func collectUntil(ok func() bool) bool {
	for range 500 {
		runtime.GC()
		if ok() {
			return true
		}
		time.Sleep(10 * time.Millisecond)
	}
	return false
}

var sink [][]byte

func TestTunerFollowsTheLiveHeap(t *testing.T) {
	prev := gogc()
	p := Policy{Percent: 50, Floor: 16 << 20}
	tu := Start(p)
	if tu == nil {
		t.Skip("GOGC is set in this test's environment")
	}
	// A large live heap: half of it spare.
	for range 96 {
		sink = append(sink, make([]byte, 1<<20))
	}
	// (Changes under a tenth are skipped: on the way up it may stop at
	// 52-55.)
	if !collectUntil(func() bool { return gogc() >= 50 && gogc() <= 55 }) {
		t.Fatalf("with 96 MiB live, GOGC is %d, want 50", gogc())
	}
	// Let it go: a small heap keeps the floor spare, a higher GOGC.
	sink = nil
	if !collectUntil(func() bool { return gogc() > 300 && gogc() == tu.Percent() }) {
		t.Fatalf("with little live, GOGC is %d (tuner: %d), want over 300", gogc(), tu.Percent())
	}
	tu.Stop()
	if gogc() != prev {
		t.Fatalf("after Stop GOGC is %d, want %d as before", gogc(), prev)
	}
	// Stopped, it changes nothing more.
	for range 64 {
		sink = append(sink, make([]byte, 1<<20))
	}
	runtime.GC()
	runtime.GC()
	sink = nil
	if gogc() != prev {
		t.Fatalf("a stopped tuner set GOGC %d", gogc())
	}
}

func TestOperatorsGOGCWins(t *testing.T) {
	t.Setenv("GOGC", "100")
	prev := gogc()
	tu := Start(Policy{Percent: 50, Floor: 16 << 20})
	if tu != nil {
		tu.Stop()
		t.Fatal("started with GOGC set in the environment")
	}
	runtime.GC()
	if gogc() != prev {
		t.Fatalf("GOGC changed to %d", gogc())
	}
	tu.Stop() // a nil tuner stops quietly
}
