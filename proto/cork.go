package proto

import (
	"context"
	"io"
	"net"
	"sync"
)

// Cork holds a run of writes to a writer while corked and sends them as
// one write when uncorked. Beneath TLS it turns a batch of records into
// one syscall; above TLS it turns many small writes into one large one,
// which TLS cuts into full-size records. Writes while not corked (the TLS
// handshake, a pong, a close frame) go straight through.
type Cork struct {
	w      io.Writer
	limit  int // at most this much is held: past it, what is held goes out
	direct int // a write this long or longer is not held (what is held goes first)

	mu     sync.Mutex
	corked bool
	buf    *[]byte // held writes; from corkBuffers, returned when empty
}

// corkMax bounds what a cork beneath TLS holds: past it, writes go out as
// they come. Big enough that syscalls stop mattering, small enough to keep
// in the cache; the 8 KiB over 256 leave room for TLS's record overhead
// (22 bytes a record), so that 256 KiB of plaintext (what a cork above TLS
// holds at most), sealed, is still held whole. Every held-write buffer
// has this capacity.
const corkMax = 264 << 10

// corkBuffers is a cache of held-write buffers, shared by every cork so
// that a thousand idle tunnels hold none.
var corkBuffers = sync.Pool{New: func() any { b := make([]byte, 0, corkMax); return &b }}

// NewCork returns a cork on w, uncorked, for use above TLS: it holds up
// to 256 KiB, a whole number of full records, and a write of a full
// record (16 KiB) or more goes straight through after what is held,
// since TLS cuts it into full records anyway, and copying it would only
// cost.
func NewCork(w io.Writer) *Cork { return &Cork{w: w, limit: 256 << 10, direct: 16 << 10} }

// Write holds p while corked, else writes it.
func (c *Cork) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return c.w.Write(p)
	}
	if c.buf != nil && len(*c.buf)+len(p) > c.limit {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) >= c.direct {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
		return c.w.Write(p)
	}
	if c.buf == nil {
		c.buf = corkBuffers.Get().(*[]byte)
	}
	*c.buf = append(*c.buf, p...)
	return len(p), nil
}

// Cork starts holding writes.
func (c *Cork) Cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// Uncork sends what is held and stops holding. Its error is the error of
// the writes it held, which their writer was told had succeeded.
func (c *Cork) Uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	return c.flushLocked()
}

func (c *Cork) flushLocked() error {
	if c.buf == nil {
		return nil
	}
	b := c.buf
	c.buf = nil
	_, err := c.w.Write(*b)
	*b = (*b)[:0]
	corkBuffers.Put(b)
	return err
}

// Corker is what the frame batcher holds around each batch: one cork, or
// a stack of them (Corks).
type Corker interface {
	Cork()
	Uncork() error
}

// Corks is a stack of corks on one connection, the outermost (nearest the
// writer) first: Uncork releases them in that order, so what the upper
// one sends is still held by the one beneath.
type Corks []Corker

// Cork corks them all.
func (cs Corks) Cork() {
	for _, c := range cs {
		c.Cork()
	}
}

// Uncork uncorks them all, outermost first, and returns the first error.
func (cs Corks) Uncork() error {
	var first error
	for _, c := range cs {
		if err := c.Uncork(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// CorkConn is a raw connection (beneath TLS) whose owner can hold a run of
// writes and send them with one syscall. TLS writes each record (at most
// 16 KiB) with a write of its own: uncorked, a 1 MiB batch of frames took
// 64 syscalls or more, and on both ends of a bulk transfer that was most
// of the CPU.
type CorkConn struct {
	net.Conn
	cork Cork
}

// NewCorkConn wraps c.
func NewCorkConn(c net.Conn) *CorkConn {
	cc := &CorkConn{Conn: c}
	cc.cork.w, cc.cork.limit, cc.cork.direct = c, corkMax, corkMax
	return cc
}

// Write holds p while corked, else writes it.
func (c *CorkConn) Write(p []byte) (int, error) { return c.cork.Write(p) }

// Cork starts holding writes.
func (c *CorkConn) Cork() { c.cork.Cork() }

// Uncork sends what is held and stops holding.
func (c *CorkConn) Uncork() error { return c.cork.Uncork() }

// CorkListener wraps every accepted connection in a CorkConn.
type CorkListener struct{ net.Listener }

// Accept returns the next connection as a *CorkConn.
func (l CorkListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return NewCorkConn(c), nil
}

type corkKey struct{}

// CorkSlot carries, through a context, the corks a dial or an accept
// created (the raw connection's, and above TLS the upgraded body's), to
// whoever builds the tunnel on top of them.
type CorkSlot struct {
	mu    sync.Mutex
	corks Corks // the latest added first: the outermost
}

// Add records c as the outermost cork so far; a nil c is ignored.
func (s *CorkSlot) Add(c Corker) {
	if c == nil {
		return
	}
	if cc, ok := c.(*CorkConn); ok && cc == nil {
		return
	}
	s.mu.Lock()
	s.corks = append(Corks{c}, s.corks...)
	s.mu.Unlock()
}

// Corker is what was added, outermost first, or nil if nothing was.
func (s *CorkSlot) Corker() Corker {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch len(s.corks) {
	case 0:
		return nil
	case 1:
		return s.corks[0]
	}
	return append(Corks(nil), s.corks...)
}

// WithCorkSlot returns ctx carrying s.
func WithCorkSlot(ctx context.Context, s *CorkSlot) context.Context {
	return context.WithValue(ctx, corkKey{}, s)
}

// CorkSlotFrom is the slot ctx carries, or nil.
func CorkSlotFrom(ctx context.Context) *CorkSlot {
	s, _ := ctx.Value(corkKey{}).(*CorkSlot)
	return s
}

// CorkOf finds the CorkConn beneath c, through TLS: nil if there is none.
func CorkOf(c net.Conn) *CorkConn {
	for {
		switch x := c.(type) {
		case *CorkConn:
			return x
		case interface{ NetConn() net.Conn }:
			c = x.NetConn()
		default:
			return nil
		}
	}
}
