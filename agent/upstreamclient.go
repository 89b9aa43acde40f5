package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-tunnel/ferry/internal/httpx"
)

// upstreamTransport is the agent's round tripper to one upstream. A GET
// without a body (REST calls, a clone's ref advertisement: most of what
// scanners send) is written, and its response read, on the caller's
// goroutine, over a connection from the transport's own keep-alive pool.
// Everything else goes to http.Transport: a body has to stream while the
// upstream may answer before reading it, which takes a goroutine of its
// own anyway; and HEAD, whose answer a faulty server follows with a body,
// bytes that http.Transport's read loop catches arriving on an idle
// connection where this pool, with no reader on idle connections, sees
// only those that came with the response.
//
// Why: http.Transport hands every request to a write-loop goroutine and
// its response back from a read-loop goroutine, which it wakes once more
// when the body ends. Each hand-off may wake a sleeping thread, the
// costliest step of a small request on a busy (or paravirtualised) host.
//
// What http.Transport does that matters here is kept: a bound on the wait
// for the response head (ResponseTimeout) and on its size, the request
// cut when its context ends, a connection reused only once its response
// was read whole and nothing unasked followed, idle connections closed
// after IdleConnTimeout, and a request that met a kept connection the
// upstream had closed sent again on a new one (a GET is idempotent; it
// is sent again only if nothing of a response came).
type upstreamTransport struct {
	fallback *http.Transport
	// scheme and host name the upstream; requests elsewhere go to the
	// fallback.
	scheme, host string
	// dial connects to the upstream: TLS for https.
	dial        func(ctx context.Context) (net.Conn, error)
	headTimeout time.Duration // 0: none
	idleTimeout time.Duration
	maxIdle     int

	mu   sync.Mutex
	idle []*keptConn // the most recently used last
}

func newUpstreamTransport(fallback *http.Transport, base *url.URL) *upstreamTransport {
	addr := httpx.HostPort(base)
	dial := func(ctx context.Context) (net.Conn, error) { return fallback.DialContext(ctx, "tcp", addr) }
	if base.Scheme == "https" {
		dial = func(ctx context.Context) (net.Conn, error) { return fallback.DialTLSContext(ctx, "tcp", addr) }
	}
	return &upstreamTransport{
		fallback:    fallback,
		scheme:      base.Scheme,
		host:        base.Host,
		dial:        dial,
		headTimeout: fallback.ResponseHeaderTimeout,
		idleTimeout: fallback.IdleConnTimeout,
		maxIdle:     fallback.MaxIdleConnsPerHost,
	}
}

// maxUpstreamHead bounds a response head from an upstream, as the
// fallback's MaxResponseHeaderBytes does.
const maxUpstreamHead = 64 << 10

// maxUpstream1xx bounds the informational responses skipped before the
// final one.
const maxUpstream1xx = 8

func (t *upstreamTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodGet || (req.Body != nil && req.Body != http.NoBody) ||
		req.URL.Scheme != t.scheme || req.URL.Host != t.host {
		return t.fallback.RoundTrip(req)
	}
	ctx := req.Context()
	for stale := 0; ; stale++ {
		// Past maxStaleTries dead kept connections, a new one: the
		// upstream restarted, or closes every connection it keeps.
		c, err := t.conn(ctx, stale < maxStaleTries)
		if err != nil {
			return nil, err
		}
		resp, err := c.roundTrip(req)
		if err == nil {
			return resp, nil
		}
		// A kept connection the upstream closed while it sat idle (its
		// own keep-alive timeout, or a restart) fails before any
		// response byte: the request goes again. Those idle for longer
		// are closed too: they are as likely dead. A dialled one is not
		// retried.
		if !c.reused || c.head.N > 0 || ctx.Err() != nil || errors.Is(err, errUpstreamHeadTimeout) {
			return nil, err
		}
		t.closeIdleSince(c.idleSince)
	}
}

// maxStaleTries is how many kept connections found dead one request
// tries before it dials.
const maxStaleTries = 2

// CloseIdleConnections closes the kept connections no request is using,
// the fallback's too.
func (t *upstreamTransport) CloseIdleConnections() {
	t.mu.Lock()
	idle := t.idle
	t.idle = nil
	t.mu.Unlock()
	for _, c := range idle {
		c.idleTimer.Stop()
		c.conn.Close()
	}
	t.fallback.CloseIdleConnections()
}

// closeIdleSince closes the idle connections put back no later than
// since.
func (t *upstreamTransport) closeIdleSince(since time.Time) {
	t.mu.Lock()
	kept := t.idle[:0]
	var old []*keptConn
	for _, c := range t.idle {
		if c.idleSince.After(since) {
			kept = append(kept, c)
		} else {
			c.idleTimer.Stop()
			old = append(old, c)
		}
	}
	clear(t.idle[len(kept):])
	t.idle = kept
	t.mu.Unlock()
	for _, c := range old {
		c.conn.Close()
	}
}

// conn takes the most recently used idle connection if kept, or dials
// one.
func (t *upstreamTransport) conn(ctx context.Context, kept bool) (*keptConn, error) {
	var found *keptConn
	var late []*keptConn // their timers have not fired yet
	t.mu.Lock()
	for n := len(t.idle); kept && found == nil && n > 0; n = len(t.idle) {
		c := t.idle[n-1]
		t.idle[n-1] = nil
		t.idle = t.idle[:n-1]
		c.idleTimer.Stop()
		if time.Since(c.idleSince) < t.idleTimeout {
			found = c
		} else {
			late = append(late, c)
		}
	}
	t.mu.Unlock()
	// Closed outside the lock: closing TLS writes an alert.
	for _, c := range late {
		c.conn.Close()
	}
	if found != nil {
		found.reused = true
		return found, nil
	}
	conn, err := t.dial(ctx)
	if err != nil {
		return nil, err
	}
	c := &keptConn{t: t, conn: conn}
	c.head.R = conn
	c.br = bufio.NewReaderSize(&c.head, 4<<10)
	c.bw = bufio.NewWriterSize(conn, 4<<10)
	return c, nil
}

// put keeps c for the next request, or closes it if the pool is full.
func (t *upstreamTransport) put(c *keptConn) {
	t.mu.Lock()
	if len(t.idle) >= t.maxIdle {
		t.mu.Unlock()
		c.conn.Close()
		return
	}
	c.idleSince = time.Now()
	t.idle = append(t.idle, c)
	if c.idleTimer == nil {
		c.idleTimer = time.AfterFunc(t.idleTimeout, func() { t.expire(c) })
	} else {
		c.idleTimer.Reset(t.idleTimeout)
	}
	t.mu.Unlock()
}

// expire closes c if it is still idle and has been for idleTimeout.
func (t *upstreamTransport) expire(c *keptConn) {
	t.mu.Lock()
	i := slices.Index(t.idle, c)
	if i < 0 || time.Since(c.idleSince) < t.idleTimeout {
		// Taken (and perhaps put back since the timer was set).
		t.mu.Unlock()
		return
	}
	t.idle = slices.Delete(t.idle, i, i+1)
	t.mu.Unlock()
	c.conn.Close()
}

// keptConn is one connection to the upstream, used by one request at a
// time.
type keptConn struct {
	t         *upstreamTransport
	conn      net.Conn
	head      httpx.HeadLimit
	br        *bufio.Reader
	bw        *bufio.Writer
	reused    bool
	idleSince time.Time   // under t.mu
	idleTimer *time.Timer // under t.mu
}

// errUpstreamHeadTimeout: the upstream did not send a response head
// within ResponseTimeout.
var errUpstreamHeadTimeout = errors.New("timeout awaiting response headers")

// headTimeoutError is errUpstreamHeadTimeout as a net.Error, so that it
// reads as a timeout (504) like the fallback's.
type headTimeoutError struct{ d time.Duration }

func (e headTimeoutError) Error() string {
	return fmt.Sprintf("upstream sent no response head within %s: %v", e.d, errUpstreamHeadTimeout)
}
func (headTimeoutError) Timeout() bool   { return true }
func (headTimeoutError) Temporary() bool { return true }
func (headTimeoutError) Unwrap() error   { return errUpstreamHeadTimeout }

// roundTrip sends req on c and reads the response head; the body is read
// from c by the caller.
func (c *keptConn) roundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	stopCut := context.AfterFunc(ctx, func() { c.conn.Close() })
	var timedOut atomic.Bool
	var timer *time.Timer
	if c.t.headTimeout > 0 {
		timer = time.AfterFunc(c.t.headTimeout, func() {
			timedOut.Store(true)
			c.conn.Close()
		})
	}
	fail := func(err error) (*http.Response, error) {
		if timer != nil {
			timer.Stop()
		}
		stopCut()
		c.conn.Close()
		switch {
		case timedOut.Load():
			return nil, headTimeoutError{c.t.headTimeout}
		case ctx.Err() != nil:
			return nil, fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return nil, err
	}

	c.head.Reset(maxUpstreamHead)
	err := req.Write(c.bw)
	if err == nil {
		err = c.bw.Flush()
	}
	if err != nil {
		return fail(fmt.Errorf("send request to upstream: %w", err))
	}
	var resp *http.Response
	for n := 0; ; n++ {
		resp, err = http.ReadResponse(c.br, req)
		if err != nil {
			if errors.Is(err, httpx.ErrHeadTooLarge) {
				return fail(fmt.Errorf("upstream response head larger than %d bytes", maxUpstreamHead))
			}
			return fail(fmt.Errorf("read upstream response: %w", err))
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			return fail(errors.New("upstream switched protocols unasked"))
		}
		if resp.StatusCode >= 200 {
			break
		}
		if n >= maxUpstream1xx {
			return fail(fmt.Errorf("upstream sent more than %d informational responses", maxUpstream1xx))
		}
	}
	if timer != nil && !timer.Stop() {
		// The timer fired as the head arrived: the connection is closed.
		return fail(errUpstreamHeadTimeout)
	}
	c.head.Lift()
	b := &keptBody{c: c, body: resp.Body, stopCut: stopCut, keep: !resp.Close && !req.Close}
	if resp.Body == http.NoBody {
		b.finish(true)
		return resp, nil
	}
	resp.Body = b
	return resp, nil
}

// keptBody is a response body read from a kept connection; once read to
// its end the connection goes back to the pool. Closed before its end,
// the connection is closed: what is left of the body is not read.
type keptBody struct {
	c       *keptConn
	body    io.ReadCloser
	stopCut func() bool
	keep    bool
	once    sync.Once
}

func (b *keptBody) Read(p []byte) (int, error) {
	n, err := b.body.Read(p)
	if err == io.EOF {
		b.finish(true)
	}
	return n, err
}

func (b *keptBody) Close() error {
	b.finish(false)
	return nil
}

func (b *keptBody) finish(ended bool) {
	b.once.Do(func() {
		// false: the context ended and closed the connection.
		live := b.stopCut()
		// Bytes after the response were not asked for: the connection
		// is out of step with the upstream.
		if ended && live && b.keep && b.c.br.Buffered() == 0 {
			b.c.t.put(b.c)
			return
		}
		b.c.conn.Close()
	})
}
