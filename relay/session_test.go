package relay

import (
	"bytes"
	"encoding/json"
	"io"
	"log/slog"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/proto"
)

// settledGoroutines waits up to within for the goroutine count to come
// down to at most want, and returns the last count seen.
func settledGoroutines(want int, within time.Duration) int {
	n := runtime.NumGoroutine()
	for deadline := time.Now().Add(within); n > want && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
		n = runtime.NumGoroutine()
	}
	return n
}

// An idle agent connection costs the relay yamux's two goroutines and
// nothing else: no handler, no control reader, no stream acceptor parked
// for the months a tunnel lives. (The fake agents here, in the same
// process, run two each: yamux's, without pings.)
func TestIdleAgentCostsTheRelayTwoGoroutines(t *testing.T) {
	r := startPlainRelay(t, "1m")
	fakeAgent(t, r, 15000, 0) // the relay's own goroutines are all up by now
	base := steadyGoroutines()
	const agents = 8
	for range agents {
		fakeAgent(t, r, 15000, 0)
	}
	if n := settledGoroutines(base+agents*4, time.Second); n > base+agents*4 {
		buf := make([]byte, 1<<20)
		t.Fatalf("%d idle agents hold %.1f goroutines each (relay and fake agent together), want 4:\n%s",
			agents, float64(n-base)/agents, buf[:runtime.Stack(buf, true)])
	}
}

// Control messages an idle agent sends are read, including one that
// arrives in pieces, and the relay answers a draining agent.
func TestIdleAgentControlMessagesAreRead(t *testing.T) {
	r := startPlainRelay(t, "1m")
	_, ctrl, _ := fakeAgentCtrl(t, r, 15000, 0)
	ac := r.auth.Load().tunnels["t"].snapshot()[0]
	time.Sleep(100 * time.Millisecond) // idle: nothing of the relay's waits on the stream

	if err := proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgUpstreams, Upstreams: []string{"bitbucket", "jira"}}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the announced upstreams", func() bool { return slices.Equal(ac.upstreamNames(), []string{"bitbucket", "jira"}) })

	var msg bytes.Buffer
	proto.WriteMessage(&msg, proto.Message{Type: proto.MsgDraining})
	ctrl.Write(msg.Bytes()[:3])
	time.Sleep(100 * time.Millisecond)
	ctrl.Write(msg.Bytes()[3:])
	ctrl.SetReadDeadline(time.Now().Add(5 * time.Second))
	if m, err := proto.ReadMessage(ctrl); err != nil || m.Type != proto.MsgDraining {
		t.Fatalf("a draining agent got %q, %v; want the relay's draining answer", m.Type, err)
	}
	if !ac.draining.Load() {
		t.Fatal("relay still routes to a draining agent")
	}
}

// A control message written right behind the hello, while the relay is
// still busy with the handshake, is not lost.
func TestControlMessageBehindTheHelloIsRead(t *testing.T) {
	r := startPlainRelay(t, "1m")
	fakeAgentCtrl(t, r, 15000, 0, proto.Message{Type: proto.MsgUpstreams, Upstreams: []string{"jira"}})
	ac := r.auth.Load().tunnels["t"].snapshot()[0]
	waitFor(t, "the upstreams announced behind the hello", func() bool { return slices.Equal(ac.upstreamNames(), []string{"jira"}) })
}

// Streams an idle agent opens are taken and served (here: refused as not
// webhook deliveries), many at once, and what served them ends after
// (the acceptor once it has lingered).
func TestStreamsAnIdleAgentOpensAreServed(t *testing.T) {
	r := startPlainRelay(t, "1m")
	sess, _ := fakeAgent(t, r, 15000, 0)
	base := runtime.NumGoroutine()
	var streams []*yamux.Stream
	for range 40 { // more than maxWebhookStreams
		s, err := sess.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		if err := proto.WriteHeader(s, proto.Header{Kind: proto.KindHTTP, Upstream: "bitbucket"}); err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	for i, s := range streams {
		s.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := io.Copy(io.Discard, s); err != nil || n != 0 {
			t.Fatalf("stream %d: relay answered %d bytes, %v; want it closed unanswered", i, n, err)
		}
		s.Close()
	}
	if n := settledGoroutines(base, acceptLinger+3*time.Second); n > base {
		t.Fatalf("%d goroutines more than before the streams, once all were served", n-base)
	}
}

// steadyGoroutines waits (bounded) for the goroutine count to hold still
// for 100 ms, and returns it.
func steadyGoroutines() int {
	n := runtime.NumGoroutine()
	for i := 0; i < 50; i++ {
		time.Sleep(100 * time.Millisecond)
		m := runtime.NumGoroutine()
		if m == n {
			break
		}
		n = m
	}
	return n
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !ok(); {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Announced upstreams are kept sorted and without repeats; routing finds
// exactly those.
func TestAnnouncedUpstreams(t *testing.T) {
	ups, err := upstreamSet([]string{"jira", "bitbucket", "jira", "artifactory"})
	if err != nil {
		t.Fatal(err)
	}
	c := &agentConn{}
	c.upstreams.Store(&ups)
	if got := c.upstreamNames(); !slices.Equal(got, []string{"artifactory", "bitbucket", "jira"}) {
		t.Fatalf("upstreams %v", got)
	}
	for name, want := range map[string]bool{"bitbucket": true, "jira": true, "artifactory": true, "bitbucke": false, "": false, "zz": false} {
		if c.serves(name) != want {
			t.Errorf("serves(%q) = %v, want %v", name, !want, want)
		}
	}
	for _, bad := range [][]string{nil, {"Bad Name"}, {"ok", "../x"}} {
		if _, err := upstreamSet(bad); err == nil {
			t.Errorf("upstreams %q accepted", bad)
		}
	}
}

// An agent session's log lines carry the connection's attributes, and
// the agent's once its hello is done.
func TestSessionLogLinesNameTheConnection(t *testing.T) {
	var buf bytes.Buffer
	r := &Relay{log: slog.New(slog.NewJSONHandler(&buf, nil))}
	a := newAgentSession(r, &tunnel{id: "t1"}, "192.0.2.7:5000", "rid-1")
	a.log.Info("before hello")
	a.ac.Store(&agentConn{id: "conn-1", agentID: "broker-a"})
	a.log.With("delivery_id", "d1").Info("after hello")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("log: %q", buf.String())
	}
	var first, second map[string]any
	json.Unmarshal([]byte(lines[0]), &first)
	json.Unmarshal([]byte(lines[1]), &second)
	for k, v := range map[string]any{"remote": "192.0.2.7:5000", "request_id": "rid-1", "tunnel": "t1"} {
		if first[k] != v || second[k] != v {
			t.Errorf("%s: %v and %v, want %v", k, first[k], second[k], v)
		}
	}
	if _, ok := first["agent_id"]; ok {
		t.Errorf("agent id logged before the hello: %v", first)
	}
	for k, v := range map[string]any{"connection_id": "conn-1", "agent_id": "broker-a", "delivery_id": "d1"} {
		if second[k] != v {
			t.Errorf("%s: %v, want %v", k, second[k], v)
		}
	}
}
