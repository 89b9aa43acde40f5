package agent

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"
	"go.uber.org/goleak"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/proto"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeRelay speaks just enough of the protocol to get an agent connected,
// then hands the session to the test, which plays a relay that lies.
type fakeRelay struct {
	sessions chan *yamux.Session
	srv      *http.Server
	addr     string
}

func startFakeRelay(t *testing.T) *fakeRelay {
	f := &fakeRelay{sessions: make(chan *yamux.Session, 4)}
	f.srv, f.addr = serveFakeRelay(t, func(_ *yamux.Stream, sess *yamux.Session) { f.sessions <- sess })
	return f
}

// serveFakeRelay welcomes every agent that says hello, then calls
// welcomed and holds the connection until the agent closes it.
func serveFakeRelay(t *testing.T, welcomed func(ctrl *yamux.Stream, sess *yamux.Session)) (*http.Server, string) {
	return serveFakeRelayHolding(t, nil, welcomed)
}

// serveFakeRelayHolding is serveFakeRelay that, if hold is set, calls it
// between an agent's hello and its welcome, with the connection's number
// (1, 2, …).
func serveFakeRelayHolding(t *testing.T, hold func(n int), welcomed func(ctrl *yamux.Stream, sess *yamux.Session)) (*http.Server, string) {
	var conns atomic.Int32
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, &websocket.AcceptOptions{Subprotocols: []string{proto.Subprotocol}})
		if err != nil {
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		sess, _ := yamux.Server(proto.WebSocketConn(ctx, ws, nil), proto.YamuxConfig(logging.Discard(), 15*time.Second, proto.RelayStreamWindow))
		defer sess.Close()
		ctrl, err := sess.AcceptStream()
		if err != nil {
			return
		}
		if _, err := proto.ReadHeader(ctrl); err != nil {
			return
		}
		if _, err := proto.ReadMessage(ctrl); err != nil {
			return
		}
		n := conns.Add(1)
		if hold != nil {
			hold(int(n))
		}
		proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgWelcome, RelayID: "liar", Tunnel: "t", ConnectionID: fmt.Sprintf("c%d", n)})
		welcomed(ctrl, sess)
		<-sess.CloseChan()
	})}
	go srv.Serve(ln)
	return srv, ln.Addr().String()
}

// fakeRelayAgent is the config of an agent with conns connections to the
// fake relay at addr and one upstream at url; extra is added as is.
func fakeRelayAgent(t *testing.T, addr, url string, conns int, extra string) *config.Agent {
	t.Helper()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "tok"), []byte("t"), 0o600)
	os.WriteFile(filepath.Join(dir, "pat"), []byte("pat"), 0o600)
	cfg, err := config.ParseAgent("agent.yaml", []byte(fmt.Sprintf(`relay: {url: "ws://%s/v1/connect", token_file: %s, connections: %d}
upstreams:
  - {name: bitbucket, url: %q, auth: {type: bearer, token_file: %s}, profile: bitbucket-dc-read}
diagnostics: {listen: "127.0.0.1:0"}
%s`, addr, filepath.Join(dir, "tok"), conns, url, filepath.Join(dir, "pat"), extra)))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// serveAgent runs an agent on cfg until stop is called.
func serveAgent(t *testing.T, cfg *config.Agent) (a *Agent, stop func()) {
	t.Helper()
	a, err := New(cfg, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Listen(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx) }()
	return a, func() { cancel(); <-done }
}

// exchange opens a stream, writes raw, and returns the HTTP response (or
// nil if the agent closed the stream without one).
func exchange(t *testing.T, sess *yamux.Session, raw []byte) *http.Response {
	t.Helper()
	s, err := sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	s.SetDeadline(time.Now().Add(15 * time.Second))
	s.Write(raw)
	resp, err := http.ReadResponse(bufio.NewReader(s), nil)
	if err != nil {
		s.Close()
		return nil
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body = io.NopCloser(strings.NewReader(string(body)))
	s.Close()
	return resp
}

func httpStream(t *testing.T, upstream, request string) []byte {
	t.Helper()
	h, err := proto.Header{Kind: proto.KindHTTP, Upstream: upstream, RequestID: "liar00000001", Scanner: "s"}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return append(h, request...)
}

// keepAliveStream is the start of a keep-alive stream: its header alone.
func keepAliveStream(t *testing.T, request string) []byte {
	t.Helper()
	h, err := proto.Header{Kind: proto.KindHTTPKeepAlive}.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	return append(h, request...)
}

// withField adds a proto.StreamHeaderField naming upstream to a raw
// request, after its request line.
func withField(t *testing.T, upstream, rid, request string) string {
	t.Helper()
	v, err := proto.Header{Kind: proto.KindHTTP, Upstream: upstream, RequestID: rid, Scanner: "s"}.FieldValue()
	if err != nil {
		t.Fatal(err)
	}
	line, rest, _ := strings.Cut(request, "\r\n")
	return line + "\r\n" + proto.StreamHeaderField + ": " + v + "\r\n" + rest
}

func TestAgentDistrustsTheRelay(t *testing.T) {
	dir := t.TempDir()
	pki, err := testrig.NewPKI(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := testrig.MakeRepo(filepath.Join(dir, "git"), "PROJ", "app", 2); err != nil {
		t.Fatal(err)
	}
	bb := &testrig.Bitbucket{GitRoot: filepath.Join(dir, "git"), Token: "pat", User: "svc"}
	bbLn, _ := net.Listen("tcp", "127.0.0.1:0")
	bbSrv := &http.Server{Handler: bb, TLSConfig: pki.ServerTLS()}
	go bbSrv.ServeTLS(bbLn, "", "")
	defer bbSrv.Close()

	relay := startFakeRelay(t)
	defer relay.srv.Close()
	os.WriteFile(filepath.Join(dir, "tok"), []byte("t"), 0o600)
	os.WriteFile(filepath.Join(dir, "pat"), []byte("pat"), 0o600)
	cfg, err := config.ParseAgent("agent.yaml", []byte(fmt.Sprintf(`relay: {url: "ws://%s/v1/connect", token_file: %s, connections: 1}
upstreams:
  - {name: bitbucket, url: "https://%s", ca_file: %s, auth: {type: bearer, token_file: %s}, profile: bitbucket-dc-read}
diagnostics: {listen: "127.0.0.1:0"}
`, relay.addr, filepath.Join(dir, "tok"), bbLn.Addr(), pki.CAFile, filepath.Join(dir, "pat"))))
	if err != nil {
		t.Fatal(err)
	}
	a, stop := serveAgent(t, cfg)
	defer stop()
	sess := <-relay.sessions
	// The agent's own credential check talks to Bitbucket once at start;
	// count what arrives after it.
	for deadline := time.Now().Add(10 * time.Second); len(a.Status().Credentials) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("credential check did not finish")
		}
		time.Sleep(10 * time.Millisecond)
	}

	lies := []struct {
		name   string
		raw    []byte
		status int // 0: the agent must close the stream without answering
	}{
		{"garbage instead of a header", []byte("GET / HTTP/1.1\r\n\r\n"), 0},
		{"header of an unknown kind", append([]byte{'F', 'Y', 1, 99, 0, 0}, "GET / HTTP/1.1\r\n\r\n"...), 0},
		{"oversized header", []byte{'F', 'Y', 1, 2, 0xff, 0xff}, 0},
		{"absolute-form target to another host", httpStream(t, "bitbucket", "GET http://evil.example/rest/api/1.0/projects HTTP/1.1\r\nHost: evil.example\r\n\r\n"), 400},
		{"unknown upstream", httpStream(t, "internal-admin", "GET /rest/api/1.0/projects HTTP/1.1\r\nHost: x\r\n\r\n"), 404},
		{"traversal", httpStream(t, "bitbucket", "GET /rest/api/1.0/projects/P/repos/r/raw/%2e%2e/%2e%2e/x HTTP/1.1\r\nHost: x\r\n\r\n"), 400},
		{"not HTTP after the header", httpStream(t, "bitbucket", "\x00\x01\x02 garbage\r\n\r\n"), 400},
		{"a push on a read profile", httpStream(t, "bitbucket", "POST /scm/proj/app.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n0000"), 403},
		{"credential smuggled in a header", httpStream(t, "bitbucket", "GET /rest/api/1.0/projects HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer stolen\r\nX-Http-Method-Override: DELETE\r\n\r\n"), 400},
		{"keep-alive request without its header", keepAliveStream(t, "GET /rest/api/1.0/projects HTTP/1.1\r\nHost: x\r\n\r\n"), 400},
		{"keep-alive request with a garbled header", keepAliveStream(t, "GET /rest/api/1.0/projects HTTP/1.1\r\nHost: x\r\n"+proto.StreamHeaderField+": RlkBAg!!\r\n\r\n"), 400},
		{"keep-alive request with two headers", keepAliveStream(t, withField(t, "bitbucket", "r1", withField(t, "bitbucket", "r2", "GET /rest/api/1.0/projects HTTP/1.1\r\nHost: x\r\n\r\n"))), 400},
		{"a request's own header on a plain stream", httpStream(t, "internal-admin", withField(t, "bitbucket", "r1", "GET /rest/api/1.0/projects HTTP/1.1\r\nHost: x\r\n\r\n")), 404},
	}
	before := len(bb.Seen())
	for _, l := range lies {
		resp := exchange(t, sess, l.raw)
		switch {
		case l.status == 0 && resp != nil:
			t.Errorf("%s: agent answered %d", l.name, resp.StatusCode)
		case l.status != 0 && (resp == nil || resp.StatusCode != l.status):
			t.Errorf("%s: got %v, want %d", l.name, resp, l.status)
		}
	}
	if n := len(bb.Seen()) - before; n != 0 {
		t.Fatalf("Bitbucket received %d requests from a lying relay", n)
	}
	// Through all that the connection stayed up, and honest requests work.
	resp := exchange(t, sess, httpStream(t, "bitbucket", "GET /rest/api/1.0/projects/PROJ/repos/app HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
	if resp == nil || resp.StatusCode != 200 {
		t.Fatalf("honest request after the lies: %v", resp)
	}
	if got := bb.Seen()[len(bb.Seen())-1].Header.Get("Authorization"); got != "Bearer pat" {
		t.Fatalf("upstream saw Authorization %q", got)
	}
	if a.Connected() != 1 {
		t.Fatal("the agent dropped the connection")
	}

	// A plain stream carries one request: the answer says it closes.
	if resp := exchange(t, sess, httpStream(t, "bitbucket", "GET /rest/api/1.0/projects/PROJ/repos/app HTTP/1.1\r\nHost: x\r\n\r\n")); resp == nil || !resp.Close {
		t.Fatalf("a plain stream's answer does not close it: %v", resp)
	}
	// A keep-alive stream serves requests one after another, each judged
	// by its own header, which never reaches Bitbucket.
	s, err := sess.OpenStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	s.SetDeadline(time.Now().Add(15 * time.Second))
	br := bufio.NewReader(s)
	before = len(bb.Seen())
	for i, c := range []struct {
		raw    string
		status int
	}{
		{string(keepAliveStream(t, withField(t, "bitbucket", "keepalive0001", "GET /rest/api/1.0/projects/PROJ/repos/app HTTP/1.1\r\nHost: x\r\n\r\n"))), 200},
		{withField(t, "internal-admin", "keepalive0002", "GET /rest/api/1.0/projects/PROJ/repos/app HTTP/1.1\r\nHost: x\r\n\r\n"), 404},
		{"GET /rest/api/1.0/projects/PROJ/repos/app HTTP/1.1\r\nHost: x\r\n\r\n", 400},
		{withField(t, "bitbucket", "keepalive0004", "GET /rest/api/1.0/projects/PROJ/repos/app HTTP/1.1\r\nHost: x\r\n\r\n"), 200},
	} {
		if _, err := io.WriteString(s, c.raw); err != nil {
			t.Fatal(err)
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("keep-alive request %d: %v", i, err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.status || resp.Close {
			t.Fatalf("keep-alive request %d: %d (closes: %v), want %d on a stream kept open", i, resp.StatusCode, resp.Close, c.status)
		}
		if rid := resp.Header.Get(httperr.RequestIDHeader); c.status != 400 && rid != fmt.Sprintf("keepalive%04d", i+1) {
			t.Fatalf("keep-alive request %d answered as request %q", i, rid)
		}
	}
	got := bb.Seen()[before:]
	if len(got) != 2 {
		t.Fatalf("Bitbucket saw %d requests from the keep-alive stream, want 2", len(got))
	}
	for _, r := range got {
		if v := r.Header.Get(proto.StreamHeaderField); v != "" {
			t.Fatalf("Bitbucket received %s: %q", proto.StreamHeaderField, v)
		}
	}
}

// A relay that sends every connection away as soon as it is welcomed does
// not get the agent dialling in a tight loop: after a few immediate
// reconnects (a rebalance asks up to 3 times), the agent backs off.
func TestRelayThatAlwaysSaysGoAwayGetsBackoff(t *testing.T) {
	var dials atomic.Int32
	srv, addr := serveFakeRelay(t, func(ctrl *yamux.Stream, _ *yamux.Session) {
		dials.Add(1)
		proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgGoAway, Reason: "go away"})
	})
	defer srv.Close()

	_, stop := serveAgent(t, fakeRelayAgent(t, addr, "http://127.0.0.1:1", 1, ""))
	// In 1.5 s: 1 + 3 at once, then waits of 250-500 ms and 500-1000 ms:
	// at most 6 dials. A tight loop makes hundreds.
	time.Sleep(1500 * time.Millisecond)
	stop()
	if n := dials.Load(); n < 2 || n > 6 {
		t.Fatalf("%d dials in 1.5 s of goaways; want reconnects, the first ones at once, then backoff", n)
	}
}

// A connection the relay welcomes after the agent began to drain (it was
// dialling when SIGTERM came, or it was a reload's successor) is drained
// like the others: the relay is told at once to send it nothing, rather
// than having it take requests that the end of the drain would cut.
func TestConnectionWelcomedDuringDrainIsDrained(t *testing.T) {
	// An upstream that answers the test's request once released (and the
	// agent's credential check at once).
	arrived, release := make(chan struct{}, 1), make(chan struct{})
	up := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/rest/api/1.0/projects/SLOW" {
			arrived <- struct{}{}
			<-release
		}
		io.WriteString(w, "{}")
	})}
	upLn, _ := net.Listen("tcp", "127.0.0.1:0")
	go up.Serve(upLn)
	defer up.Close()

	second := make(chan struct{})     // the second connection's welcome waits for it
	secondHeld := make(chan struct{}) // its hello has come
	first := make(chan *yamux.Session, 1)
	told := make(chan string, 1) // what the second connection heard first on its control stream
	var welcomed atomic.Int32
	srv, addr := serveFakeRelayHolding(t, func(n int) {
		if n == 2 {
			close(secondHeld)
			<-second
		}
	}, func(ctrl *yamux.Stream, sess *yamux.Session) {
		if welcomed.Add(1) == 1 {
			first <- sess
			// The first connection: ack draining, as a relay does.
			go func() {
				for {
					m, err := proto.ReadMessage(ctrl)
					if err != nil {
						return
					}
					if m.Type == proto.MsgDraining {
						proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgDraining})
					}
				}
			}()
			return
		}
		ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
		m, err := proto.ReadMessage(ctrl)
		if err != nil {
			told <- "nothing: " + err.Error()
			return
		}
		told <- m.Type
		proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgDraining})
	})
	defer srv.Close()

	_, stop := serveAgent(t, fakeRelayAgent(t, addr, "http://"+upLn.Addr().String(), 2, "timeouts: {drain: 20s}\n"))
	sess := <-first
	// A request in flight on the first connection keeps the drain going.
	answered := make(chan int, 1)
	go func() {
		resp := exchange(t, sess, httpStream(t, "bitbucket", "GET /rest/api/1.0/projects/SLOW HTTP/1.1\r\nHost: x\r\n\r\n"))
		if resp == nil {
			answered <- 0
			return
		}
		answered <- resp.StatusCode
	}()
	<-arrived
	// Both connections dialled before the drain: a slot that has not
	// dialled by then never does (seen under load, a slow second dial).
	select {
	case <-secondHeld:
	case <-time.After(10 * time.Second):
		close(release)
		t.Fatal("the agent's second connection did not say hello")
	}
	stopped := make(chan struct{})
	go func() { stop(); close(stopped) }() // SIGTERM: the agent drains
	time.Sleep(300 * time.Millisecond)
	close(second) // the second connection is welcomed while the drain waits

	select {
	case m := <-told:
		if m != proto.MsgDraining {
			t.Errorf("the connection welcomed during the drain was first told %q, want %q", m, proto.MsgDraining)
		}
	case <-time.After(10 * time.Second):
		t.Error("the connection welcomed during the drain was told nothing")
	}
	close(release)
	if code := <-answered; code != http.StatusOK {
		t.Errorf("the request in flight when the drain began: %d, want 200", code)
	}
	<-stopped
}
