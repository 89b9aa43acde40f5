package agent

import (
	"context"
	"net"
	"sync"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/proto"
)

// streamListener feeds tunnel streams, header already read, to one
// http.Server shared by all relay connections. Accept returns net.ErrClosed
// after Close.
type streamListener struct {
	ch        chan net.Conn
	done      chan struct{}
	closeOnce sync.Once
}

func newStreamListener() *streamListener {
	return &streamListener{ch: make(chan net.Conn), done: make(chan struct{})}
}

func (l *streamListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *streamListener) Close() error {
	l.closeOnce.Do(func() { close(l.done) })
	return nil
}

func (l *streamListener) Addr() net.Addr { return tunnelAddr{} }

// offer hands a stream to the server; false if the listener is closed or
// ctx ends first (the caller then closes the stream).
func (l *streamListener) offer(ctx context.Context, c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.done:
		return false
	case <-ctx.Done():
		return false
	}
}

type tunnelAddr struct{}

func (tunnelAddr) Network() string { return "ferry" }
func (tunnelAddr) String() string  { return "tunnel" }

// tunnelConn is a request stream with the header the relay sent on it.
// release runs once, when the stream is closed.
type tunnelConn struct {
	*yamux.Stream
	header  proto.Header
	once    sync.Once
	release func()
}

func (c *tunnelConn) Close() error {
	c.once.Do(c.release)
	return c.Stream.Close()
}

type connKey struct{}

// connContext gives each request its stream (http.Server.ConnContext).
func connContext(ctx context.Context, c net.Conn) context.Context {
	if tc, ok := c.(*tunnelConn); ok {
		return context.WithValue(ctx, connKey{}, tc)
	}
	return ctx
}

func connFrom(ctx context.Context) *tunnelConn {
	tc, _ := ctx.Value(connKey{}).(*tunnelConn)
	return tc
}

func headerFrom(ctx context.Context) (proto.Header, bool) {
	if tc := connFrom(ctx); tc != nil {
		return tc.header, true
	}
	return proto.Header{}, false
}
