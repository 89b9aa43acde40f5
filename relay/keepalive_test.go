package relay

import (
	"context"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"
	"go.uber.org/goleak"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/token"
	"github.com/ferry-tunnel/ferry/proto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// newPlainRelay builds a relay without TLS, its listeners bound, with
// timeouts (a YAML flow mapping's body), one tunnel "t" and one scanner
// (token "scanner-token").
func newPlainRelay(t *testing.T, timeouts string) *Relay {
	t.Helper()
	cfg, err := config.ParseRelay("relay.yaml", []byte(`agent_listen: "127.0.0.1:0"
insecure_plaintext: true
scanner_listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
timeouts: {`+timeouts+`}
tunnels: [{id: t, agent_tokens: ["`+token.Of("agent-token").String()+`"]}]
scanners: [{name: s, token: "`+token.Of("scanner-token").String()+`", tunnels: [t]}]
`))
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(cfg, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Listen(); err != nil {
		t.Fatal(err)
	}
	return r
}

// startPlainRelay runs a relay without TLS whose own ping interval is
// keepalive, and stops it when the test ends.
func startPlainRelay(t *testing.T, keepalive string) *Relay {
	t.Helper()
	r := newPlainRelay(t, "shutdown_grace: 1s, keepalive: "+keepalive)
	servePlainRelay(t, r)
	return r
}

// servePlainRelay runs r until the test ends.
func servePlainRelay(t *testing.T, r *Relay) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Serve(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
}

// countingConn counts the bytes an agent receives.
type countingConn struct {
	net.Conn
	n atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// fakeAgent connects to r and says hello announcing keepaliveMS, and
// pings every ping (0: never). It returns the session and a count of the
// bytes received after the welcome.
func fakeAgent(t *testing.T, r *Relay, keepaliveMS int64, ping time.Duration) (*yamux.Session, *atomic.Int64) {
	t.Helper()
	sess, _, n := fakeAgentCtrl(t, r, keepaliveMS, ping)
	return sess, n
}

// fakeAgentCtrl is fakeAgent returning the control stream too; early
// are control messages written right behind the hello, before the
// welcome.
func fakeAgentCtrl(t *testing.T, r *Relay, keepaliveMS int64, ping time.Duration, early ...proto.Message) (*yamux.Session, *yamux.Stream, *atomic.Int64) {
	t.Helper()
	hello := proto.Message{Type: proto.MsgHello, AgentID: "fake", Version: "test", Upstreams: []string{"bitbucket"}, KeepaliveMS: keepaliveMS}
	return dialFakeAgent(t, r, hello, ping, early...)
}

// dialFakeAgent connects to r and says hello.
func dialFakeAgent(t *testing.T, r *Relay, hello proto.Message, ping time.Duration, early ...proto.Message) (*yamux.Session, *yamux.Stream, *atomic.Int64) {
	t.Helper()
	tun := r.auth.Load().tunnels["t"]
	before := len(tun.snapshot())
	ctx, cancel := context.WithCancel(context.Background())
	ws, _, err := websocket.Dial(ctx, "ws://"+r.AgentAddr()+proto.ConnectPath, &websocket.DialOptions{
		HTTPHeader:   map[string][]string{"Authorization": {"Bearer agent-token"}},
		Subprotocols: []string{proto.Subprotocol},
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	conn := &countingConn{Conn: proto.WebSocketConn(ctx, ws, nil)}
	sess, err := yamux.Client(conn, proto.YamuxConfig(logging.Discard(), ping, proto.AgentStreamWindow))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		sess.Close()
		cancel()
	})
	ctrl, err := sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	if err := proto.WriteHeader(ctrl, proto.Header{Kind: proto.KindControl}); err != nil {
		t.Fatal(err)
	}
	for _, m := range append([]proto.Message{hello}, early...) {
		if err := proto.WriteMessage(ctrl, m); err != nil {
			t.Fatal(err)
		}
	}
	if m, err := proto.ReadMessage(ctrl); err != nil || m.Type != proto.MsgWelcome {
		t.Fatalf("hello answered with %q, %v", m.Type, err)
	}
	// The welcome comes just before the relay routes requests to the
	// connection: wait for that too.
	for deadline := time.Now().Add(5 * time.Second); len(tun.snapshot()) == before; {
		if time.Now().After(deadline) {
			t.Fatal("relay did not take the agent connection into its tunnel")
		}
		time.Sleep(5 * time.Millisecond)
	}
	conn.n.Store(0)
	return sess, ctrl, &conn.n
}

func closedWithin(sess *yamux.Session, d time.Duration) bool {
	select {
	case <-sess.CloseChan():
		return true
	case <-time.After(d):
		return false
	}
}

// An agent that announced pings and then goes silent is cut by the relay,
// which sends no pings of its own.
func TestRelayCutsAgentThatStopsPinging(t *testing.T) {
	r := startPlainRelay(t, "100ms")
	sess, received := fakeAgent(t, r, 200, 0) // says 200 ms, never pings
	// Cut after two intervals and a grace of one: 600 ms. Well before
	// then, the relay has sent nothing: no pings to an agent that pings.
	time.Sleep(300 * time.Millisecond)
	if n := received.Load(); n != 0 {
		t.Errorf("relay sent %d bytes to an idle agent that announced its own pings", n)
	}
	if !closedWithin(sess, 5*time.Second) {
		t.Fatal("relay kept a silent agent connected")
	}
}

// An agent that pings as announced stays connected, well past the silence
// that cuts a quiet one.
func TestRelayKeepsPingingAgent(t *testing.T) {
	r := startPlainRelay(t, "100ms")
	sess, _ := fakeAgent(t, r, 200, 200*time.Millisecond)
	if closedWithin(sess, 2*time.Second) {
		t.Fatal("relay cut an agent that pinged every 200 ms")
	}
}

// An agent that announces no ping interval (older agents) is pinged by
// the relay at the relay's keepalive and kept.
func TestRelayPingsAgentThatDoesNotAnnouncePings(t *testing.T) {
	r := startPlainRelay(t, "100ms")
	sess, received := fakeAgent(t, r, 0, 0)
	if closedWithin(sess, time.Second) {
		t.Fatal("relay cut an older agent that answers pings")
	}
	// About ten pings of 12 bytes, each in a WebSocket frame.
	if n := received.Load(); n < 5*12 {
		t.Fatalf("relay sent %d bytes in a second to an agent that does not ping; want its pings", n)
	}
}
