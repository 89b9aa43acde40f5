package agent

import (
	"context"
	"math/rand/v2"
	"time"
)

// sleep waits d, or until ctx ends or stop (nil: never) is closed; it
// reports whether the full wait passed.
func sleep(ctx context.Context, d time.Duration, stop <-chan struct{}) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
	case <-stop:
	}
	return false
}

// backoff is a capped exponential backoff with jitter: attempt 0 waits
// 250-500 ms (first retry well under a second), then doubling to a cap of
// 30 s, each delay drawn from [d/2, d) so that many agents cut off at once
// do not come back in step.
type backoff struct {
	base, max time.Duration
	attempt   int
}

func newBackoff() *backoff { return &backoff{base: 500 * time.Millisecond, max: 30 * time.Second} }

func (b *backoff) next() time.Duration {
	d := b.base << min(b.attempt, 16)
	if d > b.max || d <= 0 {
		d = b.max
	}
	b.attempt++
	half := d / 2
	return half + rand.N(half)
}

func (b *backoff) reset() { b.attempt = 0 }
