package relay

import (
	"testing"
	"time"
)

func TestAuthLimiter(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	l := newAuthLimiter()
	l.burst, l.every, l.max = 3, time.Second, 2
	l.now = func() time.Time { return now }

	for i := 0; i < 3; i++ {
		if lim, _ := l.limited("a"); lim {
			t.Fatalf("limited after %d failures", i)
		}
		l.failed("a")
	}
	lim, retry := l.limited("a")
	if !lim || retry <= 0 || retry > time.Second {
		t.Fatalf("after the burst: limited=%v retry=%v", lim, retry)
	}
	if lim, _ := l.limited("b"); lim {
		t.Fatal("another source is limited")
	}
	now = now.Add(time.Second)
	if lim, _ := l.limited("a"); lim {
		t.Fatal("allowance did not refill")
	}
	// A full table forgets refilled sources first, else fails closed.
	l.failed("b")
	now = now.Add(10 * time.Second)
	l.failed("c") // sweeps a and b (both refilled)
	if len(l.sources) != 1 {
		t.Fatalf("sweep kept %d sources", len(l.sources))
	}
	l.failed("d")
	// The table is full of active sources: new ones share the overflow
	// allowance, and the table stops growing.
	for _, src := range []string{"e", "f", "g", "h"} {
		l.failed(src)
	}
	if lim, _ := l.limited("zz"); !lim {
		t.Fatal("sources beyond the table bound are not limited once the overflow allowance is spent")
	}
	if len(l.sources) > l.max+1 {
		t.Fatalf("table grew to %d", len(l.sources))
	}
}
