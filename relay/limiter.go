package relay

import (
	"net"
	"net/netip"
	"sync"
	"time"
)

// authLimiter slows down token guessing: each source may fail
// authentication `burst` times, then once per `every`; past that its
// requests are answered 429 until the allowance refills. Successful
// requests cost nothing. The table is bounded: when full, sources whose
// allowance has refilled are forgotten first, and if none has, a new
// source is not tracked. That fails open on purpose: a flood from more
// sources than the table holds is slowed only where it is tracked, but
// it cannot lock out agents and scanners that never failed (a shared
// allowance for the overflow would have refused every new source, valid
// token or not). Tokens from `ferry-relay token` carry 256 bits; the
// limiter is a brake on noise and guessing, not what keeps them safe.
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

func newAuthLimiter() *authLimiter {
	return &authLimiter{burst: 20, every: 3 * time.Second, max: 10000, now: time.Now, sources: map[string]*bucket{}}
}

// sourceOf is what failures are counted against: the peer's IPv4
// address, or its IPv6 /64, which one host usually holds whole (counted
// by address, it would have 2^64 allowances). Behind a load balancer
// that does not preserve client addresses, that is the balancer, and
// failures are limited as a whole.
func sourceOf(remoteAddr string) string {
	host, _, err := net.SplitHostPort(remoteAddr)
	if err != nil {
		host = remoteAddr
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return host
	}
	ip = ip.Unmap()
	if ip.Is4() {
		return ip.String()
	}
	p, _ := ip.WithZone("").Prefix(64)
	return p.String()
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
			return // full of active offenders: not tracked (see authLimiter)
		}
		b = &bucket{tokens: float64(l.burst), last: now}
		l.sources[src] = b
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
