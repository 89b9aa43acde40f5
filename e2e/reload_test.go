package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func TestReloadPolicyAndKeepRunningConfigOnError(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	base := w.agentYAML(r.AgentAddr(), "")
	w.write("agent.yaml", base)
	a, arun := w.startAgentYAML(base)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	// The config loaded at start counts as loaded: nothing to alert on.
	checkReloadMetrics(t, "fresh agent", a.Metrics().Reloads, 0, 0, 1)
	e := &env{world: w, client: newClient()}
	defer e.client.CloseIdleConnections()
	url := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	if s, _, b := e.do("GET", url, scannerToken, nil, nil); s != 200 {
		t.Fatalf("before: %d %s", s, b)
	}

	// A deny rule and a second upstream arrive by reload, no reconnect.
	w.write("agent.yaml", strings.Replace(base, "    response_timeout: 5s\n",
		"    response_timeout: 5s\n    rules: [{methods: [GET], path: \"/rest/api/*/projects/PROJ/**\", action: deny}]\n"+
			w.upstreamYAML("mirror", w.bbURL, ""), 1))
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if s, _, b := e.do("GET", url, scannerToken, nil, nil); s != 403 || !strings.Contains(b, "rules[0]") {
		t.Fatalf("after reload: %d %s", s, b)
	}
	mirror := strings.Replace(url, "/bitbucket/", "/mirror/", 1)
	waitFor(t, "relay to learn the new upstream", func() bool {
		s, _, _ := e.do("GET", mirror, scannerToken, nil, nil)
		return s == 200
	})

	// A broken file leaves the reloaded config running.
	w.write("agent.yaml", strings.Replace(base, "profile:", "profle:", 1))
	if err := a.Reload(); err == nil {
		t.Fatal("a broken config reloaded")
	}
	if s, _, _ := e.do("GET", url, scannerToken, nil, nil); s != 403 {
		t.Fatalf("after a failed reload the deny rule is gone: %d", s)
	}
	checkReloadMetrics(t, "agent after a good and a bad reload", a.Metrics().Reloads, 1, 1, 0)
}

func TestReloadUnderLoad(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	base := w.agentYAML(r.AgentAddr(), "")
	w.write("agent.yaml", base)
	a, arun := w.startAgentYAML(base)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	client := newClient()
	defer client.CloseIdleConnections()
	url := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app/branches"

	var ok, bad atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 400; i++ {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest("GET", url, nil)
				req.Header.Set("Authorization", "Bearer "+scannerToken)
				resp, err := client.Do(req)
				if err != nil || resp.StatusCode != 200 {
					bad.Add(1)
				} else {
					ok.Add(1)
				}
				if resp != nil {
					resp.Body.Close()
				}
			}
		}()
	}
	for i := 0; i < 10; i++ {
		// Alternate between two valid configs that both allow the request.
		extra := fmt.Sprintf("    rules: [{methods: [GET], path: \"/rest/foo/%d/**\"}]\n", i)
		w.write("agent.yaml", strings.Replace(base, "    response_timeout: 5s\n", "    response_timeout: 5s\n"+extra, 1))
		if err := a.Reload(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(30 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if bad.Load() != 0 || ok.Load() == 0 {
		t.Fatalf("under reloads: %d ok, %d failed", ok.Load(), bad.Load())
	}
	t.Logf("%d requests succeeded across 10 reloads", ok.Load())
}

// checkReloadMetrics compares a daemon's reload metrics with the counts
// expected; the last success time must always be set, since the config
// loaded at start is a success.
func checkReloadMetrics(t *testing.T, when string, m metrics.Reloads, ok, failed, lastOK float64) {
	t.Helper()
	got := []float64{testutil.ToFloat64(m.Total.WithLabelValues("success")), testutil.ToFloat64(m.Total.WithLabelValues("failure")), testutil.ToFloat64(m.LastOK)}
	if !slices.Equal(got, []float64{ok, failed, lastOK}) || testutil.ToFloat64(m.LastTime) < float64(time.Now().Add(-time.Hour).Unix()) {
		t.Fatalf("%s: reloads ok %v, failed %v, last successful %v, last success at %v; want %v, %v, %v and a time",
			when, got[0], got[1], got[2], testutil.ToFloat64(m.LastTime), ok, failed, lastOK)
	}
}

func TestBinaryReloadsOnSIGHUP(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	relayProc := startProc(t, "relay", relayBin, "--config", w.write("relay.yaml", w.relayYAML("127.0.0.1:0")))
	addr := relayProc.waitLog("relay started")["agent_listen"].(string)
	cfg := w.agentYAML(addr, "")
	agentProc := startProc(t, "agent", agentBin, "--config", w.write("agent.yaml", cfg))
	diag := agentProc.waitLog("agent started")["diagnostics"].(string)
	agentProc.waitLog("connected to relay")
	w.write("agent.yaml", strings.Replace(cfg, "profile:", "profle:", 1))
	agentProc.cmd.Process.Signal(syscall.SIGHUP)
	agentProc.waitLog("config reload failed; the running config stays in force")
	// `ferry-agent status` says so, and why.
	out, err := exec.Command(agentBin, "status", "--addr", diag).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "LAST RELOAD REFUSED") || !strings.Contains(string(out), "profle") {
		t.Errorf("ferry-agent status after a refused reload: %v\n%s", err, out)
	}
	w.write("agent.yaml", cfg)
	agentProc.cmd.Process.Signal(syscall.SIGHUP)
	agentProc.waitLog("config reloaded")
	if code := agentProc.signal(syscall.SIGTERM); code != 0 {
		t.Fatalf("agent exit %d", code)
	}
	relayProc.signal(syscall.SIGTERM)
}

func TestRelayReloadRotatesTokensAndRevokes(t *testing.T) {
	w := newWorld(t)
	relayCfg := w.relayYAML("127.0.0.1:0")
	w.write("relay.yaml", relayCfg)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	a, arun := w.startAgent(r.AgentAddr(), "")
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	e := &env{world: w, client: newClient()}
	defer e.client.CloseIdleConnections()
	url := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ"
	checkReloadMetrics(t, "fresh relay", r.Metrics().Reloads, 0, 0, 1)

	// A new scanner token, added by reload, works at once.
	newScanner := "fry_new-scanner-token-after-reload"
	w.write("relay.yaml", strings.Replace(relayCfg, "scanners:\n", "scanners:\n  - name: newcomer\n    token: \""+tokenHash(newScanner)+"\"\n    tunnels: ["+tunnelID+"]\n", 1))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if s, _, b := e.do("GET", url, newScanner, nil, nil); s != 200 {
		t.Fatalf("new scanner after reload: %d %s", s, b)
	}
	// A broken file changes nothing.
	w.write("relay.yaml", "tunnels: [")
	if err := r.Reload(); err == nil {
		t.Fatal("broken relay config reloaded")
	}
	if s, _, _ := e.do("GET", url, newScanner, nil, nil); s != 200 {
		t.Fatal("a failed reload dropped the running config")
	}
	checkReloadMetrics(t, "relay after a good and a bad reload", r.Metrics().Reloads, 1, 1, 0)
	if page := getPage(t, "http://"+r.AdminAddr()+"/"); !strings.Contains(page, "config reload refused") || !strings.Contains(page, "stays in force") {
		t.Error("relay status page does not say its last reload was refused")
	}
	// Revoking the agent's token cuts its connections, and it cannot return.
	w.write("relay.yaml", strings.Replace(relayCfg, tokenHash(agentToken), tokenHash("fry_replacement"), 1))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "revoked connections closed", func() bool { return a.Connected() == 0 })
	if s, _, _ := e.do("GET", url, scannerToken, nil, nil); s != 503 {
		t.Fatalf("after revoking the agent token: %d", s)
	}
	time.Sleep(700 * time.Millisecond) // a reconnect attempt or two
	if a.Connected() != 0 {
		t.Fatal("agent reconnected with a revoked token")
	}
}

// TestAgentConnectionsPerTunnelAreCapped: past
// limits.max_agent_connections_per_tunnel the relay refuses an agent's
// upgrade, saying why in the agent's status, and the agent waits the
// Retry-After before it tries again; a reload raises the limit for the
// next agent.
func TestAgentConnectionsPerTunnelAreCapped(t *testing.T) {
	w := newWorld(t)
	limited := func(n int) string {
		return w.relayYAMLWith("127.0.0.1:0", "127.0.0.1:0", fmt.Sprintf("limits: {max_agent_connections_per_tunnel: %d}\n", n))
	}
	w.write("relay.yaml", limited(1))
	r, rrun := w.startRelayYAML(limited(1))
	defer rrun.shutdown(t)
	a, arun := w.startAgent(r.AgentAddr(), "")
	defer arun.shutdown(t)
	refused := func() string {
		for _, c := range a.Status().Connections {
			if !c.Connected && strings.Contains(c.LastError, "limits.max_agent_connections_per_tunnel") {
				return c.LastError
			}
		}
		return ""
	}
	waitFor(t, "one connection up and the other refused", func() bool { return a.Connected() == 1 && refused() != "" })
	if e := refused(); !strings.Contains(e, "503") || !strings.Contains(e, "already holds 1 agent connections") {
		t.Fatalf("the refused connection's error does not say why: %s", e)
	}
	overLimit := func() float64 {
		return testutil.ToFloat64(r.Metrics().AgentConnects.WithLabelValues(tunnelID, "over_limit"))
	}
	before := overLimit()
	if before < 1 {
		t.Fatalf("over_limit counted %v times", before)
	}
	// Without the relay's Retry-After (30 s) the agent would try again
	// after 250-500 ms, then 0.5-1 s.
	time.Sleep(1500 * time.Millisecond)
	if n, after := a.Connected(), overLimit(); n != 1 || after != before {
		t.Fatalf("%d connections up and %v refusals after %v: the agent did not wait as asked", n, after, before)
	}
	w.write("relay.yaml", limited(3))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	b, brun := w.startAgent(r.AgentAddr(), "")
	defer brun.shutdown(t)
	waitFor(t, "a second agent's two connections up under the raised limit", func() bool { return b.Connected() == 2 })
}

// TestReloadChangesConnectionCount: relay.connections changes on reload.
// Raised, the new connections dial at once. Lowered, the last ones drain:
// the relay sends them nothing more, downloads under way on them end
// whole, then they close. No request fails either way.
func TestReloadChangesConnectionCount(t *testing.T) {
	_, agentBin := binaries(t) // for ferry-agent status, built before the clock matters
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	yaml := func(n int) string {
		return strings.Replace(w.agentYAML(r.AgentAddr(), ""), "  connections: 2\n", fmt.Sprintf("  connections: %d\n", n), 1)
	}
	w.write("agent.yaml", yaml(1))
	a, arun := w.startAgentYAML(yaml(1))
	defer arun.shutdown(t)
	reload := func(n int) {
		t.Helper()
		w.write("agent.yaml", yaml(n))
		if err := a.Reload(); err != nil {
			t.Fatal(err)
		}
	}
	// relayHolds: the relay holds n of the agent's connections, draining
	// ones included, and sends requests to live of them.
	relayHolds := func(n, live int) func() bool {
		return func() bool {
			cs, err := relayConns(r.AdminAddr())
			if err != nil || len(cs) != n {
				return false
			}
			got := 0 // counted afresh: the closure is polled
			for _, c := range cs {
				if !c.Draining {
					got++
				}
			}
			return got == live
		}
	}
	slots := func() int { return len(a.Status().Connections) }
	waitFor(t, "one connection", func() bool { return a.Connected() == 1 && relayHolds(1, 1)() })
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	l := startLoad(t, 4, base)
	more := func(what string) {
		t.Helper()
		before := l.ok.Load()
		waitFor(t, what, func() bool { return l.ok.Load() > before+100 })
	}
	more("traffic")

	reload(3)
	waitFor(t, "three connections", func() bool { return a.Connected() == 3 && slots() == 3 && relayHolds(3, 3)() })
	more("traffic over three connections")
	l.finish()
	first := l

	// A slow download on each connection: the relay sends each request to
	// the connection with the fewest in flight.
	syn := testrig.Synthetic{Size: 3 << 20, Seed: [32]byte{9}, BytesPerSec: 1 << 20}
	w.bb.AddSynthetic("PROJ", "app", "slow.bin", syn)
	var dls []<-chan download
	for range 3 {
		dls = append(dls, startDownload(base+"/raw/slow.bin"))
	}
	if cs, err := relayConns(r.AdminAddr()); err != nil || len(cs) != 3 || cs[0].InFlight != 1 || cs[1].InFlight != 1 || cs[2].InFlight != 1 {
		t.Fatalf("the downloads are not one on each connection: %+v %v", cs, err)
	}

	l = startLoad(t, 4, base)
	reload(1)
	if n := slots(); n != 1 {
		t.Errorf("after lowering relay.connections to 1 the agent shows %d slots", n)
	}
	// Two connections drain, each with its download; requests go to the third.
	waitFor(t, "two connections draining", relayHolds(3, 1))
	// (The relay marks a connection draining before the agent has its ack.)
	waitFor(t, "the agent's status to show two connections finishing", func() bool { return a.Status().Finishing == 2 })
	if page := getPage(t, "http://"+a.DiagAddr()+"/"); !strings.Contains(page, "2 finishing their requests") {
		t.Error("the agent's status page does not show the connections finishing their requests")
	}
	if out, err := exec.Command(agentBin, "status", "--addr", a.DiagAddr()).CombinedOutput(); err != nil ||
		!strings.Contains(string(out), "1 of 1 relay connections up (and 2 finishing their requests before closing)") {
		t.Errorf("ferry-agent status while two connections drain: %v\n%s", err, out)
	}
	more("traffic while two connections drain")
	for i, dl := range dls {
		(<-dl).check(t, fmt.Sprintf("download %d across the reload", i), syn)
	}
	waitFor(t, "the drained connections closed", relayHolds(1, 1))
	waitFor(t, "the agent done with them", func() bool { return a.Status().Finishing == 0 })
	if n := a.Connected(); n != 1 {
		t.Errorf("agent: %d connections up, want 1", n)
	}
	more("traffic over one connection")

	// And up again: the retired slot is made anew.
	reload(2)
	waitFor(t, "two connections", func() bool { return a.Connected() == 2 && slots() == 2 && relayHolds(2, 2)() })
	more("traffic over two connections")
	l.finish()
	if n := first.failed.Load() + l.failed.Load(); n != 0 {
		t.Errorf("%d requests failed while relay.connections changed:\n%s\n%s", n, first.why(), l.why())
	}
	if v := testutil.ToFloat64(a.Metrics().RelayConnections); v != 2 {
		t.Errorf("ferry_agent_relay_connections = %v, want 2", v)
	}
}

// TestRelayReloadChangesTimeouts: an operator whose Bitbucket has turned
// slow raises the relay's agent_response by reload, without the restart
// that would drop every tunnel's connections for a moment.
func TestRelayReloadChangesTimeouts(t *testing.T) {
	w := newWorld(t)
	// An upstream that takes 2 s to answer (a large repository's pack
	// being counted).
	slowURL := w.serveUpstream(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
			io.WriteString(w, `{"size":0,"limit":25,"isLastPage":true,"values":[],"start":0}`)
		case <-r.Context().Done():
		}
	}))
	relayYAML := func(agentResponse string) string {
		return w.relayYAMLWith("127.0.0.1:0", "127.0.0.1:0", "timeouts: {agent_response: "+agentResponse+"}\n")
	}
	w.write("relay.yaml", relayYAML("1s"))
	r, rrun := w.startRelayYAML(relayYAML("1s"))
	defer rrun.shutdown(t)
	a, arun := w.startAgent(r.AgentAddr(), w.upstreamYAML("slow", slowURL, ""))
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	e := &env{world: w, relay: r, client: newClient()}
	defer e.client.CloseIdleConnections()
	url := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/slow/rest/api/1.0/projects"

	if status, _, body := e.do("GET", url, scannerToken, nil, nil); status != 504 || errorBody(t, body).Error != httperr.UpstreamTimeout {
		t.Fatalf("with agent_response 1s: %d %s, want 504 upstream_timeout", status, body)
	}
	w.write("relay.yaml", relayYAML("10s"))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if status, _, body := e.do("GET", url, scannerToken, nil, nil); status != 200 {
		t.Fatalf("after raising agent_response to 10s by reload: %d %s", status, body)
	}
	if a.Connected() != 2 {
		t.Errorf("the reload dropped agent connections: %d up", a.Connected())
	}
	checkReloadMetrics(t, "relay after the reload", r.Metrics().Reloads, 1, 0, 1)
}

// TestReloadsLeaveNoIdleUpstreamConnections: every reload builds the
// upstreams' transports anew and closes the old ones' idle connections
// (net/http then closes those that go idle later too, until the next
// request on that transport). A credential check, which makes two
// requests, or a scanner request that waited for a slot of
// max_concurrent_requests, could make that next request on the old
// transport after the reload; its connection to Bitbucket then stayed
// open for the idle timeout (90 s), one per such request.
func TestReloadsLeaveNoIdleUpstreamConnections(t *testing.T) {
	w := newWorld(t)
	var open atomic.Int64
	srv := &http.Server{Handler: w.bb, TLSConfig: w.pki.ServerTLS(), ReadHeaderTimeout: 10 * time.Second,
		ConnState: func(_ net.Conn, s http.ConnState) {
			switch s {
			case http.StateNew:
				open.Add(1)
			case http.StateClosed, http.StateHijacked:
				open.Add(-1)
			}
		}}
	ln := listenLocal(t)
	go srv.ServeTLS(ln, "", "")
	defer srv.Close()
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	yaml := strings.Replace(w.agentYAML(r.AgentAddr(), ""), w.bbURL, "https://"+ln.Addr().String(), 1)
	yaml = strings.Replace(yaml, "    response_timeout: 5s\n", "    response_timeout: 5s\n    max_concurrent_requests: 1\n", 1)
	w.write("agent.yaml", yaml)
	a, arun := w.startAgentYAML(yaml)
	defer arun.shutdown(t)
	waitFor(t, "the first credential check", func() bool { return len(a.Status().Credentials) == 1 })

	for range 40 {
		if err := a.Reload(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Millisecond) // a reload now and then lands during a check
	}
	// The last check's connection stays, idle, on the transport in use.
	waitFor(t, "the replaced transports' connections to Bitbucket closed", func() bool { return open.Load() <= 1 })

	// A request waits for the slot a download holds; the reload comes,
	// then the download ends and the waiting request goes to Bitbucket
	// on the transport it was admitted with.
	syn := testrig.Synthetic{Size: 1 << 20, Seed: [32]byte{3}, BytesPerSec: 2 << 20}
	w.bb.AddSynthetic("PROJ", "app", "slow.bin", syn)
	waitFor(t, "the agent connected", func() bool { return a.Connected() == 2 })
	repo := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	dl := startDownload(repo + "/raw/slow.bin")
	waiting := make(chan download, 1)
	go func() { waiting <- <-startDownload(repo) }()
	waitFor(t, "a request waiting for the slot", func() bool { return a.Status().Load[0].Waiting == 1 })
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	(<-dl).check(t, "the download across the reload", syn)
	if d := <-waiting; d.err != nil || d.code != 200 {
		t.Fatalf("the request that waited for the slot: %d %v", d.code, d.err)
	}
	waitFor(t, "the waiting request's connection to Bitbucket closed", func() bool { return open.Load() <= 1 })
}
