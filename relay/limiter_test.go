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
	// The table is full of active sources: new ones are not tracked, and
	// a source that never failed is never refused, however many others
	// fail (a flood cannot lock out a valid agent or scanner).
	for range 10 {
		for _, src := range []string{"e", "f", "g", "h"} {
			l.failed(src)
		}
	}
	if lim, _ := l.limited("zz"); lim {
		t.Fatal("a source that never failed is limited because others flooded the table")
	}
	if lim, _ := l.limited("e"); lim {
		t.Fatal("an untracked source is limited")
	}
	if lim, _ := l.limited("d"); lim {
		t.Fatal("a tracked source with allowance left is limited")
	}
	if len(l.sources) != l.max {
		t.Fatalf("table holds %d sources, bound %d", len(l.sources), l.max)
	}
}

// Failures count per IPv4 address and per IPv6 /64: one host holds a
// whole /64, and counted by address it would have 2^64 allowances.
func TestAuthSourceOf(t *testing.T) {
	for _, tc := range []struct{ remote, want string }{
		{"192.0.2.7:443", "192.0.2.7"},
		{"[::ffff:192.0.2.7]:443", "192.0.2.7"},
		{"[2001:db8:1:2:aaaa::1]:5000", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:bbbb::9]:5001", "2001:db8:1:2::/64"},
		{"[2001:db8:1:3::1]:5000", "2001:db8:1:3::/64"},
		{"[fe80::1%eth0]:80", "fe80::/64"},
		{"[::1]:80", "::/64"},
		{"not-an-address", "not-an-address"},
	} {
		if got := sourceOf(tc.remote); got != tc.want {
			t.Errorf("sourceOf(%q) = %q, want %q", tc.remote, got, tc.want)
		}
	}
}
