package proto

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
)

// wsConn is a net.Conn over a WebSocket's binary messages, for yamux:
// each Write is one message, Read returns the messages' bytes in order.
//
// It replaces websocket.NetConn, which is built for any use and costs a
// long-lived connection more: two cancellable contexts and two timers per
// connection, and, because its reads take a cancellable context, a context
// watch armed and disarmed for every frame read. Here reads and writes take
// no context; the connection's life is one context.AfterFunc, and the
// read deadline one timer, made when first set. yamux reads from one
// goroutine and BatchConn writes from one, so no locks of its own.
type wsConn struct {
	ws       *websocket.Conn
	msg      io.Reader // the message being read
	stopLife func() bool

	deadlineMu sync.Mutex
	deadline   *time.Timer
	expired    atomic.Bool // the read deadline passed: the conn is closed
	closeOnce  sync.Once
}

func newWSConn(ctx context.Context, ws *websocket.Conn) *wsConn {
	ws.SetReadLimit(-1) // reads stream; a batch of frames may be large
	c := &wsConn{ws: ws}
	c.stopLife = context.AfterFunc(ctx, func() { ws.CloseNow() })
	return c
}

// ErrReadIdle is what a read returns once the read deadline has passed;
// the connection is closed by then.
var ErrReadIdle = fmt.Errorf("nothing received within the read deadline: %w", os.ErrDeadlineExceeded)

func (c *wsConn) Read(p []byte) (int, error) {
	for {
		if c.msg == nil {
			typ, r, err := c.ws.Reader(context.Background())
			if err != nil {
				if c.expired.Load() {
					return 0, ErrReadIdle
				}
				switch websocket.CloseStatus(err) {
				case websocket.StatusNormalClosure, websocket.StatusGoingAway:
					return 0, io.EOF
				}
				return 0, err
			}
			if typ != websocket.MessageBinary {
				c.ws.CloseNow() // a close handshake would hold yamux's reader for 5 s
				return 0, fmt.Errorf("peer sent a %v message; ferry sends binary messages only", typ)
			}
			c.msg = r
		}
		n, err := c.msg.Read(p)
		if errors.Is(err, io.EOF) {
			c.msg, err = nil, nil
		}
		if err != nil && c.expired.Load() {
			err = ErrReadIdle
		}
		if n > 0 || err != nil {
			return n, err
		}
	}
}

func (c *wsConn) Write(p []byte) (int, error) {
	if err := c.ws.Write(context.Background(), websocket.MessageBinary, p); err != nil {
		return 0, err
	}
	return len(p), nil
}

// Close closes at once, without the close handshake.
func (c *wsConn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		c.stopLife()
		c.deadlineMu.Lock()
		if c.deadline != nil {
			c.deadline.Stop()
		}
		c.deadlineMu.Unlock()
		err = c.ws.CloseNow()
	})
	return err
}

// SetReadDeadline closes the connection if nothing arrives by t (zero:
// no deadline). Unlike a socket's, a passed deadline is final: the
// connection is over, as it is for every use here (an agent gone silent).
func (c *wsConn) SetReadDeadline(t time.Time) error {
	c.deadlineMu.Lock()
	defer c.deadlineMu.Unlock()
	if c.expired.Load() {
		return ErrReadIdle
	}
	if t.IsZero() {
		if c.deadline != nil {
			c.deadline.Stop()
		}
		return nil
	}
	d := max(time.Until(t), 1)
	if c.deadline == nil {
		c.deadline = time.AfterFunc(d, func() {
			c.expired.Store(true)
			c.ws.CloseNow()
		})
		return nil
	}
	c.deadline.Reset(d)
	return nil
}

// SetDeadline sets the read deadline; writes have none (see
// SetWriteDeadline).
func (c *wsConn) SetDeadline(t time.Time) error { return c.SetReadDeadline(t) }

// SetWriteDeadline is not supported (nothing here sets one): a write to a
// peer that stopped reading ends when the connection is closed, by its
// context or by the read deadline once the peer has gone silent.
func (c *wsConn) SetWriteDeadline(time.Time) error { return errors.ErrUnsupported }

func (c *wsConn) LocalAddr() net.Addr  { return wsAddr{} }
func (c *wsConn) RemoteAddr() net.Addr { return wsAddr{} }

// wsAddr stands in for addresses the WebSocket does not expose.
type wsAddr struct{}

func (wsAddr) Network() string { return "websocket" }
func (wsAddr) String() string  { return "websocket" }
