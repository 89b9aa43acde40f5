package httpx

import (
	"context"
	"io"
	"net"
	"net/http"
	"time"
)

// IdleDialer dials connections whose every Read must make progress within
// idle: a peer that stops sending mid-body is cut instead of holding the
// request (and its goroutines and buffers) forever.
func IdleDialer(d *net.Dialer, idle time.Duration) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &idleConn{Conn: c, idle: idle}, nil
	}
}

type idleConn struct {
	net.Conn
	idle time.Duration
}

func (c *idleConn) Read(p []byte) (int, error) {
	c.Conn.SetReadDeadline(time.Now().Add(c.idle))
	return c.Conn.Read(p)
}

// IdleBody cuts a request body that stops arriving for Idle.
type IdleBody struct {
	io.ReadCloser
	RC   *http.ResponseController
	Idle time.Duration
}

func (b *IdleBody) Read(p []byte) (int, error) {
	b.RC.SetReadDeadline(time.Now().Add(b.Idle))
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		// Past the body, the server's own background read must not
		// inherit this deadline.
		b.RC.SetReadDeadline(time.Time{})
	}
	return n, err
}

// IdleWriter cuts a response whose reader stops taking bytes for Idle.
type IdleWriter struct {
	http.ResponseWriter
	RC   *http.ResponseController
	Idle time.Duration
}

func (w *IdleWriter) Write(p []byte) (int, error) {
	w.RC.SetWriteDeadline(time.Now().Add(w.Idle))
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (w *IdleWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
