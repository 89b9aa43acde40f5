package relay

import (
	"net"
	"sync"
	"time"
)

// authLimiter slows down token guessing: each source address may fail
// authentication `burst` times, then once per `every`; past that its
// requests are answered 429 until the allowance refills. Successful
// requests cost nothing. The table is bounded: when full, sources whose
// allowance has refilled are forgotten first, and if none has, new
// sources share one overflow allowance rather than the table growing.
type authLimiter struct {
	burst int
	every time.Duration
	max   int
	now   func() time.Time

	mu      sync.Mutex
	sources map[string]*bucket
}

type bucket struct {
	tokens float64
	last   time.Time
}

// overflowKey is the shared entry for sources that found the table full.
const overflowKey = "\x00overflow"

func newAuthLimiter() *authLimiter {
	return &authLimiter{burst: 20, every: 3 * time.Second, max: 10000, now: time.Now, sources: map[string]*bucket{}}
}

// sourceOf is the address failures are counted against: the peer IP.
// (Behind a load balancer that does not preserve client IPs, that is the
// balancer; failures are then limited as a whole.)
func sourceOf(remoteAddr string) string {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		return remoteAddr
	}
	return host
}

func (l *authLimiter) refill(b *bucket, now time.Time) {
	b.tokens += now.Sub(b.last).Seconds() / l.every.Seconds()
	if b.tokens > float64(l.burst) {
		b.tokens = float64(l.burst)
	}
	b.last = now
}

// limited reports whether src has used up its failures; retry is how
// long until it may try again.
func (l *authLimiter) limited(src string) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.sources[src]
	if !ok && len(l.sources) >= l.max {
		b, ok = l.sources[overflowKey]
	}
	if !ok {
		return false, 0
	}
	l.refill(b, l.now())
	if b.tokens >= 1 {
		return false, 0
	}
	return true, time.Duration((1 - b.tokens) * float64(l.every))
}

// failed records one failed authentication from src.
func (l *authLimiter) failed(src string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	b, ok := l.sources[src]
	if !ok {
		if len(l.sources) >= l.max {
			l.sweep(now)
		}
		if len(l.sources) >= l.max {
			src = overflowKey // full of active offenders: share one allowance
		}
		if b, ok = l.sources[src]; !ok {
			b = &bucket{tokens: float64(l.burst), last: now}
			l.sources[src] = b
		}
	}
	l.refill(b, now)
	b.tokens--
	if b.tokens < 0 {
		b.tokens = 0
	}
}

// sweep forgets sources whose allowance has refilled completely.
func (l *authLimiter) sweep(now time.Time) {
	for k, b := range l.sources {
		l.refill(b, now)
		if b.tokens >= float64(l.burst) {
			delete(l.sources, k)
		}
	}
}
