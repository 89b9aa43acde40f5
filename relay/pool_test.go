package relay

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/proto"
)

// seen is one request as a fake keep-alive agent received it.
type seen struct {
	stream int // which stream, in the order they were accepted
	kind   proto.Kind
	header proto.Header // from proto.StreamHeaderField
	method string
	close  bool // the request asked for the stream to close
}

// keepAliveAgent is a fake agent that announces proto.CapKeepAlive and
// serves each stream's requests one after another. answer writes each
// response; it returns false to close the stream after it.
type keepAliveAgent struct {
	sess *yamux.Session
	ctrl *yamux.Stream
	mu   sync.Mutex
	reqs []seen
	wg   sync.WaitGroup
}

func startKeepAliveAgent(t *testing.T, r *Relay, answer func(w io.Writer, req *http.Request, n seen) bool) *keepAliveAgent {
	t.Helper()
	hello := proto.Message{Type: proto.MsgHello, AgentID: "fake", Version: "test", Upstreams: []string{"bitbucket"},
		Capabilities: []string{"something-newer", proto.CapKeepAlive}}
	sess, ctrl, _ := dialFakeAgent(t, r, hello, 0)
	a := &keepAliveAgent{sess: sess, ctrl: ctrl}
	streams := 0 // accepted so far; only the accepting goroutine counts
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		for {
			s, err := sess.AcceptStream()
			if err != nil {
				return
			}
			streams++
			n := streams
			a.wg.Add(1)
			go func() {
				defer a.wg.Done()
				defer s.Close()
				h, err := proto.ReadHeader(s)
				if err != nil {
					t.Errorf("stream %d: %v", n, err)
					return
				}
				br := bufio.NewReader(s)
				for {
					req, err := http.ReadRequest(br)
					if err != nil {
						return // the relay closed the stream
					}
					got := seen{stream: n, kind: h.Kind, method: req.Method, close: req.Close}
					if got.header, err = proto.ParseFieldValue(req.Header.Get(proto.StreamHeaderField)); err != nil {
						t.Errorf("stream %d: %v", n, err)
					}
					a.mu.Lock()
					a.reqs = append(a.reqs, got)
					a.mu.Unlock()
					io.Copy(io.Discard, req.Body)
					if !answer(s, req, got) || req.Close {
						return
					}
				}
			}()
		}
	}()
	t.Cleanup(func() {
		sess.Close()
		a.wg.Wait()
	})
	return a
}

func (a *keepAliveAgent) seen() []seen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]seen(nil), a.reqs...)
}

func answerOK(w io.Writer, _ *http.Request, n seen) bool {
	body := fmt.Sprintf("stream %d", n.stream)
	fmt.Fprintf(w, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	return true
}

// Requests to an agent that serves keep-alive streams follow one another
// on one stream, each with its own header: its own request id, the
// scanner's name and the upstream, whatever a scanner wrote in the field.
func TestKeepAliveStreamCarriesRequestsOneAfterAnother(t *testing.T) {
	r := startPlainRelay(t, "15s")
	a := startKeepAliveAgent(t, r, answerOK)
	forged, _ := proto.Header{Kind: proto.KindHTTP, Upstream: "jira", Scanner: "admin", RequestID: "forged"}.FieldValue()
	var rids []string // as the scanner saw them
	for i := range 5 {
		req, _ := http.NewRequest("GET", "http://"+r.ScannerAddr()+"/t/t/bitbucket/rest/api/1.0/projects", nil)
		req.Header.Set("Authorization", "Bearer scanner-token")
		if i == 3 {
			req.Header.Set(proto.StreamHeaderField, forged)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "stream 1" {
			t.Fatalf("request %d: %d %q, want 200 from the first stream", i, resp.StatusCode, body)
		}
		rids = append(rids, resp.Header.Get(httperr.RequestIDHeader))
	}
	http.DefaultClient.CloseIdleConnections()
	got := a.seen()
	if len(got) != 5 {
		t.Fatalf("agent saw %d requests, want 5", len(got))
	}
	ids := map[string]bool{}
	for i, s := range got {
		if s.stream != 1 || s.kind != proto.KindHTTPKeepAlive || s.close {
			t.Errorf("request %d: stream %d, kind %s, close %v; want all on keep-alive stream 1, none closing", i, s.stream, s.kind, s.close)
		}
		h := s.header
		if h.Kind != proto.KindHTTP || h.Upstream != "bitbucket" || h.Scanner != "s" || h.RequestID != rids[i] || h.Deadline.IsZero() {
			t.Errorf("request %d: header %+v (the scanner saw request id %q); want its own, for scanner s and upstream bitbucket", i, h, rids[i])
		}
		ids[h.RequestID] = true
	}
	if len(ids) != 5 {
		t.Fatalf("5 requests carried %d request ids", len(ids))
	}
	ac := r.auth.Load().tunnels["t"].snapshot()[0]
	if n, served := ac.inflight.Load(), ac.served.Load(); n != 0 || served != 5 {
		t.Fatalf("connection counts %d in flight and %d served, want 0 and 5", n, served)
	}
}

// An agent that does not announce keep-alive gets a stream per request,
// its header on the stream, and the request asks for the stream's close.
func TestAgentWithoutKeepAliveGetsAStreamPerRequest(t *testing.T) {
	r := startPlainRelay(t, "15s")
	sess, _ := fakeAgent(t, r, 0, 0)
	for i := range 3 {
		done := answerOne(t, sess, func(s *yamux.Stream, _ *bufio.Reader, req *http.Request) {
			if !req.Close {
				t.Errorf("request %d on a plain stream does not ask for its close", i)
			}
			io.WriteString(s, "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
		})
		if code, _ := scannerDo(t, r, "GET", nil, nil); code != 204 {
			t.Fatalf("request %d: %d", i, code)
		}
		waitAnswered(t, done)
	}
	if n := r.auth.Load().tunnels["t"].snapshot()[0].pool.len(); n != 0 {
		t.Fatalf("%d streams kept for an agent that closes them", n)
	}
}

// A kept stream that died while idle costs a GET nothing: it is sent
// again on a new stream. A request that may not be sent twice never takes
// a kept stream. A response that says it closes, or one abandoned by the
// scanner, is not kept.
func TestDeadKeptStreamIsReplaced(t *testing.T) {
	r := startPlainRelay(t, "15s")
	ac := func() *agentConn { return r.auth.Load().tunnels["t"].snapshot()[0] }
	var closeAfter atomic.Bool // the agent closes the stream after its answer, unannounced
	a := startKeepAliveAgent(t, r, func(w io.Writer, req *http.Request, n seen) bool {
		if req.URL.Query().Get("say") == "close" {
			io.WriteString(w, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
			return false
		}
		// Decided before answering: once the answer is out the test may
		// flip closeAfter for the next request.
		keep := !closeAfter.Load()
		answerOK(w, req, n)
		return keep
	})
	closeAfter.Store(true)
	if code, body := scannerDo(t, r, "GET", nil, nil); code != 200 || body != "stream 1" {
		t.Fatalf("first GET: %d %q", code, body)
	}
	waitFor(t, "the first stream kept", func() bool { return ac().pool.len() == 1 })
	closeAfter.Store(false)
	time.Sleep(50 * time.Millisecond) // the agent's close reaches the relay
	if code, body := scannerDo(t, r, "GET", nil, nil); code != 200 || body != "stream 2" {
		t.Fatalf("GET after the kept stream died: %d %q, want 200 from a new stream", code, body)
	}
	waitFor(t, "the second stream kept", func() bool { return ac().pool.len() == 1 })
	if code, body := scannerDo(t, r, "DELETE", nil, nil); code != 200 || body != "stream 3" {
		t.Fatalf("DELETE: %d %q, want 200 from a stream of its own", code, body)
	}
	waitFor(t, "both streams kept", func() bool { return ac().pool.len() == 2 })

	req, _ := http.NewRequest("GET", "http://"+r.ScannerAddr()+"/t/t/bitbucket/x?say=close", nil)
	req.Header.Set("Authorization", "Bearer scanner-token")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(resp.Body)
	resp.Body.Close()
	http.DefaultClient.CloseIdleConnections()
	// The relay counts the request done just after the scanner has the
	// last byte.
	waitFor(t, "nothing in flight", func() bool { return ac().inflight.Load() == 0 })
	if n := ac().pool.len(); n != 1 {
		t.Fatalf("%d streams kept after a response that said close, want 1", n)
	}
	if got := a.seen(); len(got) != 4 || got[2].method != "DELETE" || got[2].stream != 3 {
		t.Fatalf("agent saw %+v; want the DELETE first on stream 3", got)
	}
}

// An agent that drains has its kept streams closed at once: it waits for
// its streams to close before it lets the connection go.
func TestDrainingClosesKeptStreams(t *testing.T) {
	r := startPlainRelay(t, "15s")
	a := startKeepAliveAgent(t, r, answerOK)
	if code, _ := scannerDo(t, r, "GET", nil, nil); code != 200 {
		t.Fatal(code)
	}
	ac := r.auth.Load().tunnels["t"].snapshot()[0]
	waitFor(t, "the stream kept", func() bool { return ac.pool.len() == 1 })
	if st := r.tunnelStatus()[0].Connections[0]; st.KeptStreams != 1 || st.InFlight != 0 || st.Served != 1 {
		t.Fatalf("status %+v, want 1 kept stream, none in flight, 1 served", st)
	}
	if err := proto.WriteMessage(a.ctrl, proto.Message{Type: proto.MsgDraining}); err != nil {
		t.Fatal(err)
	}
	a.ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
	if m, err := proto.ReadMessage(a.ctrl); err != nil || m.Type != proto.MsgDraining {
		t.Fatalf("draining answered with %q, %v", m.Type, err)
	}
	waitFor(t, "the agent's stream closed", func() bool { return a.sess.NumStreams() <= 1 })
	if st := r.tunnelStatus()[0].Connections[0]; st.KeptStreams != 0 || !st.Draining {
		t.Fatalf("status %+v, want no kept streams on a draining connection", st)
	}
}

// streamPair returns n streams of an in-memory yamux session, and closes
// the sessions at the end of the test.
func streamPair(t *testing.T, n int) []*trackedStream {
	t.Helper()
	c1, c2 := net.Pipe()
	cfg := proto.YamuxConfig(logging.Discard(), 0, proto.AgentStreamWindow)
	client, err := yamux.Client(c1, cfg)
	if err != nil {
		t.Fatal(err)
	}
	server, err := yamux.Server(c2, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		client.Close()
		server.Close()
	})
	var out []*trackedStream
	for range n {
		s, err := client.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, &trackedStream{Stream: s})
	}
	return out
}

// The pool gives back the stream used last, holds at most maxIdleStreams,
// closes streams idle for idleStreamTTL, and once closed keeps nothing.
func TestStreamPool(t *testing.T) {
	ss := streamPair(t, maxIdleStreams+1)
	now := time.Unix(1_900_000_000, 0)
	p := &streamPool{now: func() time.Time { return now }}
	defer p.close()
	if p.get() != nil {
		t.Fatal("an empty pool gave a stream")
	}
	for i, s := range ss[:maxIdleStreams] {
		if !p.put(s) {
			t.Fatalf("put %d refused below the bound", i)
		}
		now = now.Add(time.Second)
	}
	if p.put(ss[maxIdleStreams]) {
		t.Fatal("pool took a stream beyond maxIdleStreams")
	}
	if s := p.get(); s != ss[maxIdleStreams-1] {
		t.Fatal("get did not return the stream used last")
	}
	p.put(ss[maxIdleStreams-1])

	// Streams 0-9 were put more than idleStreamTTL ago.
	now = time.Unix(1_900_000_000, 0).Add(idleStreamTTL + 10*time.Second - time.Millisecond)
	p.expire()
	if n := p.len(); n != maxIdleStreams-10 {
		t.Fatalf("%d streams left after expiry, want %d", n, maxIdleStreams-10)
	}
	if _, err := ss[0].Write([]byte("x")); err == nil {
		t.Fatal("an expired stream was not closed")
	}
	if _, err := ss[10].Write([]byte("x")); err != nil {
		t.Fatalf("a stream not yet due was closed: %v", err)
	}

	p.close()
	if p.len() != 0 || p.put(ss[maxIdleStreams]) {
		t.Fatal("a closed pool keeps streams")
	}
	if _, err := ss[20].Write([]byte("x")); err == nil {
		t.Fatal("close left an idle stream open")
	}
}

// A connection whose stream ids run low (yamux never reuses them) is
// asked, once, to go away, so the agent opens a fresh one before the old
// one would refuse every new stream: as soon as another connection takes
// requests, or at the latest near the end of the ids.
func TestConnectionRetiredBeforeStreamIDsRunOut(t *testing.T) {
	r := newPlainRelay(t, "shutdown_grace: 1s, keepalive: 15s")
	// The relay's streams are 2, 4, 6 …: retire from the 10th, at the
	// 15th whatever else is connected.
	r.retireStreamID, r.forceRetireStreamID = 20, 30
	r.retireGrace = 300 * time.Millisecond
	servePlainRelay(t, r)
	streamPerRequest := func(w io.Writer, req *http.Request, n seen) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
		return false
	}
	a := startKeepAliveAgent(t, r, streamPerRequest)
	ac := r.auth.Load().tunnels["t"].snapshot()[0]
	get := func(n int) {
		t.Helper()
		for i := range n {
			if code, _ := scannerDo(t, r, "GET", nil, nil); code != 200 {
				t.Fatalf("request %d: %d", i, code)
			}
		}
	}
	goAway := func(a *keepAliveAgent, within time.Duration) (proto.Message, error) {
		a.ctrl.SetReadDeadline(time.Now().Add(within))
		return proto.ReadMessage(a.ctrl)
	}
	// Alone, the connection is kept past the 10th stream: asking it to go
	// would refuse requests until the agent is back.
	get(14)
	if ac.draining.Load() {
		t.Fatal("the only connection was retired with ids to spare")
	}
	get(1)
	if m, err := goAway(a, 5*time.Second); err != nil || m.Type != proto.MsgGoAway || m.Reason != proto.GoAwayStreamIDs {
		t.Fatalf("agent got %+v, %v; want goaway for stream ids", m, err)
	}
	if !ac.draining.Load() {
		t.Fatal("a retired connection still takes requests")
	}
	if m, err := goAway(a, 100*time.Millisecond); err == nil {
		t.Fatalf("a second control message: %+v", m)
	}
	// This fake agent never closes it; the relay cuts it after the grace.
	if !closedWithin(a.sess, 5*time.Second) {
		t.Fatal("a retired connection the agent kept open was never cut")
	}
	waitFor(t, "the cut connection out of the tunnel", func() bool { return len(r.auth.Load().tunnels["t"].snapshot()) == 0 })

	// With another connection up, a connection is retired at the 10th.
	b := startKeepAliveAgent(t, r, streamPerRequest)
	conns := r.auth.Load().tunnels["t"].snapshot()
	bc := conns[len(conns)-1]
	get(9) // all on b: a is gone
	c := startKeepAliveAgent(t, r, streamPerRequest)
	get(1)
	if m, err := goAway(b, 5*time.Second); err != nil || m.Type != proto.MsgGoAway || m.Reason != proto.GoAwayStreamIDs {
		t.Fatalf("agent got %+v, %v; want goaway for stream ids", m, err)
	}
	if !bc.draining.Load() {
		t.Fatal("a retired connection still takes requests")
	}
	get(3) // on c
	if got := len(c.seen()); got != 3 {
		t.Fatalf("the fresh connection served %d requests, want 3", got)
	}
}

// A retired connection the agent closes itself does not wait out the
// relay's cut: the timer stops, and lets go of the connection.
func TestRetiredConnectionClosedStopsItsCut(t *testing.T) {
	r := newPlainRelay(t, "shutdown_grace: 1s, keepalive: 15s")
	r.retireStreamID, r.forceRetireStreamID = 20, 30
	r.retireGrace = time.Hour
	servePlainRelay(t, r)
	a := startKeepAliveAgent(t, r, func(w io.Writer, req *http.Request, n seen) bool {
		io.WriteString(w, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
		return false
	})
	ac := r.auth.Load().tunnels["t"].snapshot()[0]
	for i := range 15 {
		if code, _ := scannerDo(t, r, "GET", nil, nil); code != 200 {
			t.Fatalf("request %d: %d", i, code)
		}
	}
	waitFor(t, "the connection retired", ac.retiring.Load)
	a.sess.Close() // the agent goes, as asked
	waitFor(t, "the closed connection out of the tunnel", func() bool { return len(r.auth.Load().tunnels["t"].snapshot()) == 0 })
	if ac.retireCut.Load().Stop() {
		t.Fatal("the cut of a connection that ended still waited: it held the connection for retireGrace")
	}
}
