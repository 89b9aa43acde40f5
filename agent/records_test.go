package agent

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/proto"
)

// countingListener hands out its accepted conns as record counters, and
// offers each to conns; one no test waits for is not offered (the accept
// loop must never block on it).
type countingListener struct {
	net.Listener
	conns chan *testrig.TLSRecords
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	rc := &testrig.TLSRecords{Conn: c}
	select {
	case l.conns <- rc:
	default:
	}
	return rc, nil
}

// tlsServer serves h over TLS on loopback; conns yields each accepted raw
// conn.
func tlsServer(t *testing.T, pki *testrig.PKI, h http.Handler) (addr string, conns chan *testrig.TLSRecords) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	conns = make(chan *testrig.TLSRecords, 16)
	srv := &http.Server{Handler: h, TLSConfig: pki.ServerTLS(), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.ServeTLS(countingListener{ln, conns}, "", "")
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return ln.Addr().String(), conns
}

// A request body leaves for the upstream in large writes: without the
// cork beneath TLS each 16 KiB record was a write syscall of its own.
func TestUpstreamBodiesLeaveInLargeWrites(t *testing.T) {
	pki, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := tlsServer(t, pki, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, err := io.Copy(h, r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		fmt.Fprintf(w, "%d %x", n, h.Sum(nil))
	}))
	var writes atomic.Int64
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return writeCounter{c, &writes}, nil
	}
	tr := &http.Transport{DialTLSContext: upstreamTLSDialer(dial, pki.ClientTLS(), 5*time.Second, httpx.NewBufferPool(upstreamBodyChunk))}
	defer tr.CloseIdleConnections()

	body := bytes.Repeat([]byte("ferry moves bodies whole. "), (8<<20)/26)
	req, _ := http.NewRequest("POST", "https://"+addr+"/sink", bytes.NewReader(body))
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := fmt.Sprintf("%d %x", len(body), sha256.Sum256(body)); string(got) != want {
		t.Fatalf("upstream got %q, want %q", got, want)
	}
	// 8 MiB in 16 KiB records is 512 records; in pieces of 256 KiB, one
	// write each, it is 32 writes (plus the handshake and the head).
	if n := writes.Load(); n > int64(len(body)/upstreamBodyChunk)+16 {
		t.Errorf("an 8 MiB body took %d writes to the upstream; want about %d", n, len(body)/upstreamBodyChunk)
	}
}

type writeCounter struct {
	net.Conn
	n *atomic.Int64
}

func (c writeCounter) Write(p []byte) (int, error) {
	c.n.Add(1)
	return c.Conn.Write(p)
}

// The dialer still verifies the upstream's certificate against the
// configured CA and the host name, and says what failed.
func TestUpstreamTLSVerifiesTheServer(t *testing.T) {
	pki, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	other, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	addr, _ := tlsServer(t, pki, http.NotFoundHandler())
	dial := (&net.Dialer{}).DialContext
	pool := httpx.NewBufferPool(upstreamBodyChunk)
	_, port, _ := net.SplitHostPort(addr)
	cases := map[string]struct {
		cfg  *tls.Config
		addr string
	}{
		"untrusted CA":   {other.ClientTLS(), addr},
		"wrong hostname": {pki.ClientTLS(), net.JoinHostPort("127.0.0.2", port)},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			if c.addr != addr {
				if ln, err := net.Listen("tcp", c.addr); err != nil {
					t.Skip("no 127.0.0.2 here:", err)
				} else {
					ln.Close()
				}
				// 127.0.0.2 reaches the same server only through a
				// dialer that rewrites the address.
				dial = func(ctx context.Context, network, _ string) (net.Conn, error) {
					return (&net.Dialer{}).DialContext(ctx, network, addr)
				}
			}
			conn, err := upstreamTLSDialer(dial, c.cfg, 5*time.Second, pool)(context.Background(), "tcp", c.addr)
			if err == nil {
				conn.Close()
				t.Fatal("handshake with an unverifiable server succeeded")
			}
			if !strings.Contains(err.Error(), "TLS handshake with "+c.addr) || !strings.Contains(err.Error(), "certificate") {
				t.Errorf("error %q does not say the handshake failed on the certificate", err)
			}
		})
	}
}

// An upstream that accepts the connection and never answers the
// handshake is given up on after the handshake timeout, with that said.
func TestUpstreamTLSHandshakeTimesOut(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	held := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			held <- c // silent: never a ServerHello
		}
	}()
	dial := upstreamTLSDialer((&net.Dialer{}).DialContext, &tls.Config{}, 200*time.Millisecond, httpx.NewBufferPool(upstreamBodyChunk))
	conn, err := dial(context.Background(), "tcp", ln.Addr().String())
	if err == nil {
		conn.Close()
		t.Fatal("handshake with a silent server succeeded")
	}
	if !strings.Contains(err.Error(), "timed out after 200ms") {
		t.Errorf("error %q does not say the handshake timed out", err)
	}
	select {
	case c := <-held:
		c.Close()
	case <-time.After(5 * time.Second):
		t.Fatal("the server never saw the connection")
	}
}

// A batch of frames the agent sends leaves in full TLS records: the
// WebSocket client masks through a 4 KiB buffer, and without the cork
// above TLS each 4 KiB became a record of its own.
func TestAgentFramesLeaveInFullRecords(t *testing.T) {
	pki, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	received := make(chan []byte, 2)
	addr, conns := tlsServer(t, pki, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		defer ws.CloseNow()
		ws.SetReadLimit(-1)
		for { // until the client goes
			_, b, err := ws.Read(r.Context())
			if err != nil {
				return
			}
			received <- b
		}
	}))
	cfg := &config.Agent{Relay: config.RelayClient{CA: pki.Pool}, Timeouts: config.AgentTimeouts{Dial: 5 * time.Second, TLSHandshake: 5 * time.Second, Upgrade: 5 * time.Second}}
	client, err := newRelayClient(cfg, func(*url.URL) (*url.URL, error) { return nil, nil })
	if err != nil {
		t.Fatal(err)
	}
	defer client.CloseIdleConnections()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	slot := &proto.CorkSlot{}
	ws, _, err := websocket.Dial(proto.WithCorkSlot(ctx, slot), "wss://"+addr+"/", &websocket.DialOptions{HTTPClient: client})
	if err != nil {
		t.Fatal(err)
	}
	raw := <-conns
	conn := proto.WebSocketConn(ctx, ws, slot.Corker())
	defer conn.Close()
	send := func(batch []byte) {
		t.Helper()
		if _, err := conn.Write(batch); err != nil {
			t.Fatal(err)
		}
		select {
		case b := <-received:
			if !bytes.Equal(b, batch) {
				t.Fatalf("relay received %d bytes, want the %d-byte batch", len(b), len(batch))
			}
		case <-time.After(20 * time.Second):
			t.Fatal("batch never arrived")
		}
	}
	// TLS starts a connection with small records (dynamic record sizing,
	// the first 128 KiB); past them, records are full.
	send(bytes.Repeat([]byte("warm"), 64<<10))
	before := raw.Records()
	send(bytes.Repeat([]byte("0123456789abcdef"), 1<<16)) // 1 MiB, one message
	// 1 MiB and the frame head are 65 full records; in 4 KiB records they
	// were 257.
	if n := raw.Records() - before; n > 65 {
		t.Errorf("a 1 MiB batch arrived in %d TLS records; want about 64", n)
	}
}
