package relay

import (
	"sync"
	"time"
)

const (
	// maxIdleStreams bounds the keep-alive streams an agent connection
	// keeps between requests: enough for a scanner fleet's usual
	// concurrency, few enough that each side's cost stays small (an idle
	// stream is an HTTP connection goroutine and its buffers on the agent).
	maxIdleStreams = 64
	// idleStreamTTL is how long a keep-alive stream waits for its next
	// request before the relay closes it. The agent sets no idle timeout
	// of its own, so the relay never sends a request into a stream the
	// agent is closing.
	idleStreamTTL = 30 * time.Second
	// keepRecvBuffer: a stream that received at most this much for its
	// last request keeps its receive buffer while idle.
	keepRecvBuffer = 32 << 10
)

// streamPool holds an agent connection's idle keep-alive streams. The
// newest is reused first, so under a steady load the same streams carry
// the requests and the rest age out. The zero value is ready; close ends
// it for good (the connection drains or ends), and put then refuses.
type streamPool struct {
	mu     sync.Mutex
	idle   []idleStream // oldest first
	closed bool
	sweep  *time.Timer // armed while idle holds streams
	now    func() time.Time
}

type idleStream struct {
	s     *trackedStream
	since time.Time
}

func (p *streamPool) clock() time.Time {
	if p.now != nil {
		return p.now()
	}
	return time.Now()
}

// get takes the most recently used idle stream, or returns nil.
func (p *streamPool) get() *trackedStream {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.idle)
	if n == 0 {
		return nil
	}
	s := p.idle[n-1].s
	p.idle[n-1] = idleStream{}
	p.idle = p.idle[:n-1]
	return s
}

// put keeps s for a later request. It reports false when the pool is
// closed or full: the caller then closes s.
func (p *streamPool) put(s *trackedStream) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed || len(p.idle) >= maxIdleStreams {
		return false
	}
	// The receive buffer grew with the responses the stream carried: one
	// that may have grown it large is let go. A small one is kept, or the
	// next response would grow a new one.
	if s.got > keepRecvBuffer {
		s.Shrink()
	}
	p.idle = append(p.idle, idleStream{s: s, since: p.clock()})
	if p.sweep == nil {
		p.sweep = time.AfterFunc(idleStreamTTL, p.expire)
	} else if len(p.idle) == 1 {
		p.sweep.Reset(idleStreamTTL)
	}
	return true
}

// expire closes the streams idle for idleStreamTTL and re-arms for the
// next one to come due.
func (p *streamPool) expire() {
	p.mu.Lock()
	now := p.clock()
	n := 0
	for n < len(p.idle) && now.Sub(p.idle[n].since) >= idleStreamTTL {
		n++
	}
	old := p.take(n)
	if !p.closed && len(p.idle) > 0 {
		p.sweep.Reset(idleStreamTTL - now.Sub(p.idle[0].since))
	}
	p.mu.Unlock()
	closeAll(old)
}

// close closes the idle streams and refuses any put after it.
func (p *streamPool) close() {
	p.mu.Lock()
	p.closed = true
	if p.sweep != nil {
		p.sweep.Stop()
	}
	old := p.take(len(p.idle))
	p.mu.Unlock()
	closeAll(old)
}

// take removes the n oldest idle streams; p.mu is held.
func (p *streamPool) take(n int) []*trackedStream {
	if n == 0 {
		return nil
	}
	out := make([]*trackedStream, n)
	for i := range n {
		out[i] = p.idle[i].s
	}
	p.idle = append(p.idle[:0], p.idle[n:]...)
	clear(p.idle[len(p.idle):cap(p.idle)])
	return out
}

// len is how many streams are idle.
func (p *streamPool) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.idle)
}

// closeAll closes streams outside the pool's lock: a close writes a frame,
// which waits if the session is stuck.
func closeAll(ss []*trackedStream) {
	for _, s := range ss {
		s.Close()
	}
}
