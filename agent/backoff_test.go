package agent

import (
	"testing"
	"time"
)

func TestBackoffFirstRetryFastThenCapped(t *testing.T) {
	for i := 0; i < 100; i++ {
		b := newBackoff()
		if d := b.next(); d < 250*time.Millisecond || d >= 500*time.Millisecond {
			t.Fatalf("first retry %v, want in [250ms, 500ms)", d)
		}
	}
	b := newBackoff()
	var last time.Duration
	for i := 0; i < 40; i++ {
		last = b.next()
		if last > 30*time.Second {
			t.Fatalf("attempt %d waits %v, above the 30s cap", i, last)
		}
	}
	if last < 15*time.Second {
		t.Fatalf("after 40 attempts the wait is %v, want near the cap", last)
	}
	b.reset()
	if d := b.next(); d >= time.Second {
		t.Fatalf("after reset %v", d)
	}
}
