package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// connCount tracks an upstream's connections as its server sees them.
type connCount struct {
	mu     sync.Mutex
	opened int
	closed int
}

func (c *connCount) state(_ net.Conn, s http.ConnState) {
	c.mu.Lock()
	defer c.mu.Unlock()
	switch s {
	case http.StateNew:
		c.opened++
	case http.StateClosed, http.StateHijacked:
		c.closed++
	}
}

func (c *connCount) get() (opened, closed int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.opened, c.closed
}

// waitClosed waits until the server has seen n connections close.
func (c *connCount) waitClosed(t *testing.T, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if _, closed := c.get(); closed >= n {
			return
		}
	}
	opened, closed := c.get()
	t.Fatalf("upstream saw %d of %d connections closed, want %d closed", closed, opened, n)
}

// tlsUpstream serves h over TLS on loopback and returns the agent's
// upstream for it, with responseTimeout as its response_timeout.
func tlsUpstream(t *testing.T, h http.Handler, responseTimeout time.Duration) (*upstream, *http.Server, *connCount) {
	t.Helper()
	pki, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cc := &connCount{}
	srv := &http.Server{Handler: h, TLSConfig: pki.ServerTLS(), ConnState: cc.state, ErrorLog: slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeTLS(ln, "", "")
	}()
	u, err := newUpstream(&config.Upstream{Name: "bb", URL: "https://" + ln.Addr().String(), CA: pki.Pool, ResponseTimeout: responseTimeout},
		config.AgentTimeouts{Dial: 5 * time.Second, TLSHandshake: 5 * time.Second, Idle: 30 * time.Second},
		slog.New(slog.DiscardHandler), httpx.NewBufferPool(32<<10), httpx.NewBufferPool(upstreamBodyChunk))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		u.transport.CloseIdleConnections()
		srv.Close()
		<-done
	})
	return u, srv, cc
}

func get(t *testing.T, u *upstream, method, path string) (*http.Response, string) {
	t.Helper()
	resp, body, err := tryGet(u, method, path)
	if err != nil {
		t.Fatal(err)
	}
	return resp, body
}

func tryGet(u *upstream, method, path string) (*http.Response, string, error) {
	req, err := http.NewRequest(method, u.cfg.URL+path, nil)
	if err != nil {
		return nil, "", err
	}
	resp, err := u.transport.RoundTrip(req)
	if err != nil {
		return nil, "", fmt.Errorf("%s %s: %w", method, path, err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil {
		return nil, "", fmt.Errorf("%s %s: read body: %w", method, path, err)
	}
	return resp, string(b), nil
}

func TestUpstreamRequestsShareKeptConnections(t *testing.T) {
	u, _, cc := tlsUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/early":
			w.Header().Set("Link", "</style.css>; rel=preload")
			w.WriteHeader(http.StatusEarlyHints)
		case "/unchanged":
			w.WriteHeader(http.StatusNotModified)
			return
		case "/chunked":
			w.Header().Set("Trailer", "X-Checksum")
			io.WriteString(w, "part one,")
			w.(http.Flusher).Flush()
			defer w.Header().Set("X-Checksum", "abc")
		}
		fmt.Fprintf(w, "%s %s", r.Method, r.URL.Path)
	}), time.Minute)

	for i := range 10 {
		path := fmt.Sprintf("/rest/api/1.0/projects/%d", i)
		if _, body := get(t, u, http.MethodGet, path); body != "GET "+path {
			t.Fatalf("body %q", body)
		}
	}
	if resp, body := get(t, u, http.MethodHead, "/head"); resp.StatusCode != 200 || body != "" {
		t.Fatalf("HEAD: %d %q", resp.StatusCode, body)
	}
	if resp, _ := get(t, u, http.MethodGet, "/unchanged"); resp.StatusCode != http.StatusNotModified {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if resp, body := get(t, u, http.MethodGet, "/early"); resp.StatusCode != 200 || body != "GET /early" {
		t.Fatalf("after 103: %d %q %v", resp.StatusCode, body, resp.Header)
	}
	if resp, body := get(t, u, http.MethodGet, "/chunked"); body != "part one,GET /chunked" || resp.Trailer.Get("X-Checksum") != "abc" {
		t.Fatalf("chunked body %q, trailer %v", body, resp.Trailer)
	}
	// The HEAD went through http.Transport, on a connection of its own.
	if opened, _ := cc.get(); opened != 2 {
		t.Fatalf("upstream saw %d connections for 14 requests one after another, want 2", opened)
	}

	// So does a body.
	req, _ := http.NewRequest(http.MethodPost, u.cfg.URL+"/post", strings.NewReader("x"))
	resp, err := u.transport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(b) != "POST /post" {
		t.Fatalf("POST body %q", b)
	}

	// Closing the idle connections closes them at the upstream.
	u.transport.CloseIdleConnections()
	cc.waitClosed(t, 2)
}

func TestUpstreamConnectionsItClosedAreRedialled(t *testing.T) {
	u, srv, cc := tlsUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(20 * time.Millisecond) // so that the requests below overlap
		io.WriteString(w, "ok")
	}), time.Minute)

	// Five kept connections, then the upstream closes them all while
	// they sit idle, as on its keep-alive timeout or a restart.
	var wg sync.WaitGroup
	for range 5 {
		wg.Go(func() {
			if _, _, err := tryGet(u, http.MethodGet, "/"); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if opened, _ := cc.get(); opened != 5 {
		t.Fatalf("%d connections, want 5", opened)
	}
	srv.SetKeepAlivesEnabled(false) // closes the idle connections
	cc.waitClosed(t, 5)
	srv.SetKeepAlivesEnabled(true)

	// The first request meets a dead connection, closes it and those
	// idle longer, and goes again on a new one, which the next requests
	// reuse. None fails.
	if _, body := get(t, u, http.MethodGet, "/"); body != "ok" {
		t.Fatalf("body %q", body)
	}
	u.transport.mu.Lock()
	idle := len(u.transport.idle)
	u.transport.mu.Unlock()
	if idle != 1 {
		t.Fatalf("%d idle connections after the retry, want 1: the dead ones must be closed, not kept", idle)
	}
	for i := range 3 {
		if _, body := get(t, u, http.MethodGet, "/"); body != "ok" {
			t.Fatalf("request %d: body %q", i, body)
		}
	}
	if opened, _ := cc.get(); opened != 6 {
		t.Fatalf("upstream saw %d connections, want 6 (5, then one new, kept)", opened)
	}
}

func TestUpstreamConnectionIsNotKeptWhenItCannotBe(t *testing.T) {
	u, _, cc := tlsUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/close":
			w.Header().Set("Connection", "close")
		case "/large":
			w.Write(make([]byte, 1<<20))
			return
		}
		io.WriteString(w, "ok")
	}), time.Minute)

	get(t, u, http.MethodGet, "/close")
	cc.waitClosed(t, 1)

	// A body closed before its end: the rest is not read, the
	// connection goes.
	req, _ := http.NewRequest(http.MethodGet, u.cfg.URL+"/large", nil)
	resp, err := u.transport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadFull(resp.Body, make([]byte, 100))
	resp.Body.Close()
	cc.waitClosed(t, 2)

	get(t, u, http.MethodGet, "/")
	get(t, u, http.MethodGet, "/")
	if opened, closed := cc.get(); opened != 3 || closed != 2 {
		t.Fatalf("upstream saw %d connections, %d closed; want 3, 2", opened, closed)
	}
}

func TestUpstreamTimeoutsAndCancellation(t *testing.T) {
	// The handler sees the agent's connection go, and reports it; it
	// never ends a response itself (its end could cross the agent's
	// close, and the body would then read whole).
	release := make(chan struct{})
	gone := make(chan string, 2)
	u, _, _ := tlsUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/trickle" {
			io.WriteString(w, "first")
			w.(http.Flusher).Flush()
		}
		select {
		case <-release:
			return
		case <-r.Context().Done():
			gone <- r.URL.Path
		}
		<-release
	}), 300*time.Millisecond)
	defer close(release)
	waitGone := func(path string) {
		t.Helper()
		select {
		case p := <-gone:
			if p != path {
				t.Fatalf("the connection of %s went, want %s", p, path)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("the upstream never saw the connection of %s go", path)
		}
	}

	// No head within response_timeout: a timeout error (504 to the
	// scanner), and the connection closed.
	req, _ := http.NewRequest(http.MethodGet, u.cfg.URL+"/slow", nil)
	_, err := u.transport.RoundTrip(req)
	if err == nil || !httpx.IsTimeout(err) {
		t.Fatalf("err %v, want a timeout", err)
	}
	if !strings.Contains(err.Error(), "300ms") {
		t.Fatalf("err %q does not say how long it waited", err)
	}
	waitGone("/slow")

	// The request's context ends while its body is read: the read
	// fails at once and the connection goes.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, u.cfg.URL+"/trickle", nil)
	resp, err := u.transport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, first); err != nil || string(first) != "first" {
		t.Fatalf("read %q, %v", first, err)
	}
	time.AfterFunc(50*time.Millisecond, cancel)
	if _, err := io.ReadAll(resp.Body); err == nil {
		t.Fatal("body read on after the context ended")
	}
	resp.Body.Close()
	waitGone("/trickle")

	// A context already ended: no request.
	req, _ = http.NewRequestWithContext(ctx, http.MethodGet, u.cfg.URL+"/", nil)
	if _, err := u.transport.RoundTrip(req); !errors.Is(err, context.Canceled) {
		t.Fatalf("err %v, want context.Canceled", err)
	}
}

func TestUpstreamIdleConnectionsExpire(t *testing.T) {
	u, _, cc := tlsUpstream(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}), time.Minute)
	u.transport.idleTimeout = 100 * time.Millisecond
	get(t, u, http.MethodGet, "/")
	cc.waitClosed(t, 1)
	get(t, u, http.MethodGet, "/")
	if opened, _ := cc.get(); opened != 2 {
		t.Fatalf("upstream saw %d connections, want 2", opened)
	}
}

// rawUpstream answers each connection with what reply writes, whatever
// was asked, and counts connections.
func rawUpstream(t *testing.T, reply func(w *bufio.Writer)) (*upstream, func() int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	conns := 0
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns++
			mu.Unlock()
			wg.Go(func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for {
					if _, err := http.ReadRequest(br); err != nil {
						return
					}
					bw := bufio.NewWriter(c)
					reply(bw)
					if bw.Flush() != nil {
						return
					}
				}
			})
		}
	})
	u, err := newUpstream(&config.Upstream{Name: "bb", URL: "http://" + ln.Addr().String(), ResponseTimeout: 5 * time.Second},
		config.AgentTimeouts{Dial: 5 * time.Second, Idle: 5 * time.Second},
		slog.New(slog.DiscardHandler), httpx.NewBufferPool(32<<10), httpx.NewBufferPool(upstreamBodyChunk))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		u.transport.CloseIdleConnections()
		ln.Close()
		wg.Wait()
	})
	return u, func() int {
		mu.Lock()
		defer mu.Unlock()
		return conns
	}
}

func TestUpstreamThatMisbehavesIsNotTrusted(t *testing.T) {
	t.Run("head too large", func(t *testing.T) {
		u, _ := rawUpstream(t, func(w *bufio.Writer) {
			io.WriteString(w, "HTTP/1.1 200 OK\r\n")
			for range 100 {
				fmt.Fprintf(w, "X-Filler: %s\r\n", strings.Repeat("a", 1000))
			}
			io.WriteString(w, "Content-Length: 0\r\n\r\n")
		})
		req, _ := http.NewRequest(http.MethodGet, u.cfg.URL+"/", nil)
		if _, err := u.transport.RoundTrip(req); err == nil || !strings.Contains(err.Error(), "larger than 65536 bytes") {
			t.Fatalf("err %v, want the head refused as too large", err)
		}
	})
	t.Run("endless informational responses", func(t *testing.T) {
		u, _ := rawUpstream(t, func(w *bufio.Writer) {
			for range 20 {
				io.WriteString(w, "HTTP/1.1 103 Early Hints\r\n\r\n")
			}
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
		})
		req, _ := http.NewRequest(http.MethodGet, u.cfg.URL+"/", nil)
		if _, err := u.transport.RoundTrip(req); err == nil || !strings.Contains(err.Error(), "informational") {
			t.Fatalf("err %v, want the 1xx flood refused", err)
		}
	})
	t.Run("an upgrade nobody asked for", func(t *testing.T) {
		u, _ := rawUpstream(t, func(w *bufio.Writer) {
			io.WriteString(w, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		})
		req, _ := http.NewRequest(http.MethodGet, u.cfg.URL+"/", nil)
		if _, err := u.transport.RoundTrip(req); err == nil || !strings.Contains(err.Error(), "switched protocols") {
			t.Fatalf("err %v, want the 101 refused", err)
		}
	})
	t.Run("bytes after the response", func(t *testing.T) {
		// A second response nobody asked for follows the first: the
		// connection is out of step and must not carry the next request,
		// which would read the stray answer as its own.
		u, conns := rawUpstream(t, func(w *bufio.Writer) {
			io.WriteString(w, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
		})
		for range 3 {
			if _, body := get(t, u, http.MethodGet, "/"); body != "ok" {
				t.Fatalf("body %q", body)
			}
		}
		if n := conns(); n != 3 {
			t.Fatalf("%d connections for 3 requests, want 3", n)
		}
	})
}

// FuzzUpstreamReplies: whatever an upstream answers a first GET with
// (a short or long body, a second response, stray bytes, a 1xx run, a
// cut head), the next GET gets its own answer. A connection kept after
// the first must not hand the next request what was left of it.
func FuzzUpstreamReplies(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst",
		"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\n\r\n",
		"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n0\r\nX-Sum: 1\r\n\r\nHTTP/1.1 200 OK\r\n",
		"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
		"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nfirst",
		"HTTP/1.0 200 OK\r\n\r\nuntil the connection closes",
		"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
		"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nfirst",
		"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nfirst",
		"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",
		"not HTTP at all",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, first []byte) {
		if len(first) > 2048 { // one write, taken in one read: within the client's buffer
			return
		}
		// In-memory connections: a loopback listener per input would run
		// out of ports to TIME_WAIT within seconds of fuzzing.
		var wg sync.WaitGroup
		defer wg.Wait()
		serve := func(c net.Conn) {
			defer c.Close()
			br := bufio.NewReader(c)
			for {
				req, err := http.ReadRequest(br)
				if err != nil {
					return
				}
				if req.URL.Path == "/first" {
					// The whole answer, then the end of the connection:
					// nothing waits on a body that never comes.
					c.Write(first)
					return
				}
				if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nSECOND"); err != nil {
					return
				}
			}
		}
		fallback := &http.Transport{
			DialContext: func(context.Context, string, string) (net.Conn, error) {
				client, server := net.Pipe()
				wg.Go(func() { serve(server) })
				return client, nil
			},
			ResponseHeaderTimeout: 5 * time.Second,
			IdleConnTimeout:       time.Minute,
			MaxIdleConnsPerHost:   upstreamIdleConns,
		}
		base, _ := url.Parse("http://bitbucket.test")
		u := &upstream{cfg: &config.Upstream{URL: base.String()}, transport: newUpstreamTransport(fallback, base)}
		defer u.transport.CloseIdleConnections()

		if resp, _, err := tryGet(u, http.MethodGet, "/first"); err == nil && resp.StatusCode < 200 {
			t.Fatalf("an informational response (%d) came back as the answer", resp.StatusCode)
		}
		resp, body, err := tryGet(u, http.MethodGet, "/second")
		if err != nil {
			t.Fatalf("the second request failed after the first was answered with %q: %v", first, err)
		}
		if resp.StatusCode != 200 || body != "SECOND" {
			t.Fatalf("the second request got %d %q after the first was answered with %q", resp.StatusCode, body, first)
		}
	})
}
