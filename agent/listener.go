package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
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
// On a keep-alive stream (proto.KindHTTPKeepAlive) requests follow one
// another, each with its own header in proto.StreamHeaderField; on the
// others the stream's header is the one request's. release runs once,
// when the stream is closed.
type tunnelConn struct {
	*yamux.Stream
	header    proto.Header
	keepAlive bool
	once      sync.Once
	release   func()
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

// requestHeader returns the header a request came with: its own on a
// keep-alive stream, the stream's otherwise. It removes the header field
// from r, which only a keep-alive stream may carry (the relay strips
// scanners' X-Ferry-* fields, and so does the agent before forwarding).
func requestHeader(r *http.Request) (proto.Header, error) {
	vs := r.Header.Values(proto.StreamHeaderField)
	r.Header.Del(proto.StreamHeaderField)
	tc := connFrom(r.Context())
	switch {
	case tc == nil:
		return proto.Header{}, errors.New("request did not come through the tunnel")
	case !tc.keepAlive:
		return tc.header, nil
	case len(vs) != 1:
		return proto.Header{}, fmt.Errorf("request on a keep-alive stream has %d %s fields, want 1", len(vs), proto.StreamHeaderField)
	}
	h, err := proto.ParseFieldValue(vs[0])
	if err != nil {
		return proto.Header{}, err
	}
	if h.Kind != proto.KindHTTP {
		return proto.Header{}, fmt.Errorf("%s: kind %s, want %s", proto.StreamHeaderField, h.Kind, proto.KindHTTP)
	}
	return h, nil
}
