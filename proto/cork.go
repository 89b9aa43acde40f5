package proto

import (
	"context"
	"net"
	"sync"
)

// CorkConn is a raw connection (beneath TLS) whose owner can hold a run of
// writes and send them with one syscall. The WebSocket library masks a
// client's message through a 4 KiB buffer, so a 1 MiB batch of frames
// leaves as 256 TLS records; uncorked, each is its own write syscall, and
// on both ends of a bulk transfer that was most of the CPU. Corked around
// one batch, they leave together. Writes while not corked (the TLS
// handshake, a pong, a close frame) go straight through.
type CorkConn struct {
	net.Conn

	mu     sync.Mutex
	corked bool
	buf    *[]byte // held writes; from corkBuffers, returned when empty
}

// corkMax bounds what a corked conn holds: past it, writes go out as they
// come. Big enough that syscalls stop mattering, small enough to keep in
// the cache.
const corkMax = 256 << 10

// corkBuffers is a cache of held-write buffers, shared by every conn so
// that a thousand idle tunnels hold none.
var corkBuffers = sync.Pool{New: func() any { b := make([]byte, 0, corkMax); return &b }}

// NewCorkConn wraps c.
func NewCorkConn(c net.Conn) *CorkConn { return &CorkConn{Conn: c} }

// Write holds p while corked, else writes it.
func (c *CorkConn) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.corked {
		return c.Conn.Write(p)
	}
	if c.buf != nil && len(*c.buf)+len(p) > corkMax {
		if err := c.flushLocked(); err != nil {
			return 0, err
		}
	}
	if len(p) >= corkMax {
		return c.Conn.Write(p)
	}
	if c.buf == nil {
		c.buf = corkBuffers.Get().(*[]byte)
	}
	*c.buf = append(*c.buf, p...)
	return len(p), nil
}

// Cork starts holding writes.
func (c *CorkConn) Cork() {
	c.mu.Lock()
	c.corked = true
	c.mu.Unlock()
}

// Uncork sends what is held and stops holding. Its error is the error of
// the writes it held, which their writer was told had succeeded.
func (c *CorkConn) Uncork() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.corked = false
	return c.flushLocked()
}

func (c *CorkConn) flushLocked() error {
	if c.buf == nil {
		return nil
	}
	b := c.buf
	c.buf = nil
	_, err := c.Conn.Write(*b)
	*b = (*b)[:0]
	corkBuffers.Put(b)
	return err
}

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

// CorkSlot carries, through a context, the CorkConn a dial or an accept
// created, to whoever builds the tunnel on top of it.
type CorkSlot struct {
	mu   sync.Mutex
	conn *CorkConn
}

// Set records c.
func (s *CorkSlot) Set(c *CorkConn) {
	s.mu.Lock()
	s.conn = c
	s.mu.Unlock()
}

// Conn is what Set recorded, or nil.
func (s *CorkSlot) Conn() *CorkConn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn
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
