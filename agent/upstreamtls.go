package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/proto"
)

// upstreamTLSDialer dials TLS to an upstream for the transport's
// DialTLSContext, so that a request body leaves in as few syscalls as
// TLS allows. Left to the transport, a body is copied 32 KiB at a time
// and TLS sends each 16 KiB record with a write syscall of its own: an
// upload through the agent took ~25,000 write syscalls a second, the
// largest part of its CPU. Here the connection takes a body in pieces of
// up to the pool's size (ReadFrom) and sends each piece's records with one
// syscall (a cork beneath TLS). The transport sends no request through a
// proxy to an upstream, which DialTLSContext would skip.
func upstreamTLSDialer(dial func(ctx context.Context, network, addr string) (net.Conn, error), cfg *tls.Config, handshake time.Duration, pool *httpx.BufferPool) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		raw, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			raw.Close()
			return nil, fmt.Errorf("upstream address %s: %w", addr, err)
		}
		c := cfg.Clone()
		if c.ServerName == "" {
			c.ServerName = host
		}
		cork := proto.NewCorkConn(raw)
		tc := tls.Client(cork, c)
		hctx := ctx
		if handshake > 0 {
			var cancel context.CancelFunc
			hctx, cancel = context.WithTimeout(ctx, handshake)
			defer cancel()
		}
		if err := tc.HandshakeContext(hctx); err != nil {
			raw.Close()
			if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
				return nil, fmt.Errorf("TLS handshake with %s: timed out after %s", addr, handshake)
			}
			return nil, fmt.Errorf("TLS handshake with %s: %w", addr, err)
		}
		return &corkedTLS{Conn: tc, cork: cork, pool: pool}, nil
	}
}

// corkedTLS is a client TLS connection whose writes larger than one
// record leave in one syscall.
type corkedTLS struct {
	*tls.Conn
	cork *proto.CorkConn
	pool *httpx.BufferPool
}

// maxRecord is TLS's largest record payload: a write no larger goes out
// as one record, and one syscall, without help.
const maxRecord = 16 << 10

func (c *corkedTLS) Write(p []byte) (int, error) {
	if len(p) <= maxRecord {
		return c.Conn.Write(p)
	}
	c.cork.Cork()
	n, err := c.Conn.Write(p)
	if uerr := c.cork.Uncork(); err == nil {
		err = uerr
	}
	return n, err
}

// ReadFrom copies r (a request body) in pieces as large as one read of r
// returns, up to the pool's buffer size. It never waits to fill a
// buffer: what a read returned is sent before the next read. (The
// wrappers hide this ReadFrom and r's WriteTo from io.CopyBuffer, so that
// it uses buf and Write.)
func (c *corkedTLS) ReadFrom(r io.Reader) (int64, error) {
	buf := c.pool.Get()
	defer c.pool.Put(buf)
	return io.CopyBuffer(struct{ io.Writer }{c}, struct{ io.Reader }{r}, buf)
}
