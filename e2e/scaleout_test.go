package e2e

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// replica is one relay process of a scaled-out relay, on fixed ports so
// that it can restart in place.
type replica struct {
	name                                    string
	agentAddr, scannerAddr, adminAddr, peer string
	cfg                                     string
	proc                                    *proc
}

// newReplica writes a replica's config; peerSecretFile "" shares a
// secret through Redis.
func newReplica(t *testing.T, w *world, name, redisURL, peerSecretFile string) *replica {
	rp := &replica{name: name, agentAddr: stableAddr(t), scannerAddr: stableAddr(t), adminAddr: stableAddr(t), peer: stableAddr(t)}
	y := w.relayYAMLWith(rp.agentAddr, rp.scannerAddr, "")
	y = strings.Replace(y, `admin_listen: "127.0.0.1:0"`, fmt.Sprintf("admin_listen: %q", rp.adminAddr), 1)
	extra := ""
	if peerSecretFile != "" {
		extra = fmt.Sprintf(", peer_secret_file: %q", peerSecretFile)
	}
	y += fmt.Sprintf("registry: {backend: redis, redis_url: %q, advertise_url: \"http://%s\"%s}\n", redisURL, rp.peer, extra)
	rp.cfg = w.write("relay-"+name+".yaml", y)
	return rp
}

func (rp *replica) start(t *testing.T, bin string) {
	rp.proc = startProc(t, "relay-"+rp.name, bin, "--config", rp.cfg)
	rp.proc.waitLog("relay started")
}

// connections is how many agent connections the replica holds for the
// test tunnel and sends requests to (not draining); -1 if it does not answer.
func (rp *replica) connections(t *testing.T) int {
	cs, err := relayConns(rp.adminAddr)
	if err != nil {
		return -1
	}
	n := 0
	for _, c := range cs {
		if !c.Draining {
			n++
		}
	}
	return n
}

func (rp *replica) readyz(t *testing.T) string {
	resp, err := newClientNoKeepAlive().Get("http://" + rp.adminAddr + "/readyz")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return fmt.Sprintf("%d %s", resp.StatusCode, b)
}

// startRedis starts a real redis-server for the test.
func startRedis(t *testing.T) *testrig.Redis {
	red, err := testrig.StartRedis(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(red.Stop)
	return red
}

func scannerGET(t *testing.T, client *http.Client, url string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+scannerToken)
	resp, err := client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestScaleOutWithRedis runs three relay replicas sharing a real Redis:
// a scanner on one replica reaches the agent on another; an agent death
// is answered 503 fast; agents behind a load balancer spread over
// replicas, so one replica restarting leaves the tunnel served; a Redis
// restart degrades only forwarding, which comes back on its own, also
// for a replica started after Redis lost the shared peer secret.
func TestScaleOutWithRedis(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w, red := newWorld(t), startRedis(t)
	a, b, c := newReplica(t, w, "a", red.URL(), ""), newReplica(t, w, "b", red.URL(), ""), newReplica(t, w, "c", red.URL(), "")
	for _, rp := range []*replica{a, b, c} {
		rp.start(t, relayBin)
	}
	client := newClient()
	defer client.CloseIdleConnections()
	restOn := func(rp *replica) string {
		return "http://" + rp.scannerAddr + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	}

	// 1. Agent on replica A only (both connections; A keeps them after
	// asking 3 times to rebalance, since A is all the agent can reach).
	agentCfg := w.write("agent-direct.yaml", w.agentYAML(a.agentAddr, ""))
	agentProc := startProc(t, "agent", agentBin, "--config", agentCfg)
	waitFor(t, "two connections on A", func() bool { return a.connections(t) == 2 })
	if n := len(procLogs(agentProc, "reconnecting after goaway")); n < 3 {
		t.Errorf("agent was asked to rebalance %d times, want 3 before A keeps it", n)
	}
	// Scanner on B: REST and a real git clone go through A.
	waitFor(t, "B forwards to A", func() bool { code, _ := scannerGET(t, client, restOn(b)); return code == 200 })
	code, body := scannerGET(t, client, restOn(b))
	if code != 200 || !strings.Contains(body, `"slug":"app"`) {
		t.Fatalf("REST via B: %d %s", code, body)
	}
	dir := t.TempDir()
	gitCmd(t, dir, scannerToken, "clone", "-q", "http://"+b.scannerAddr+"/t/"+tunnelID+"/bitbucket/scm/proj/app.git", "app")
	if log := gitCmd(t, dir+"/app", scannerToken, "log", "--oneline"); len(strings.Split(log, "\n")) != 5 {
		t.Fatalf("clone via B has %q", log)
	}
	b.proc.waitLog("scanner request") // B logged it, with via=forwarded
	// The internal listener wants the peer secret.
	req, _ := http.NewRequest("GET", "http://"+a.peer+"/t/"+tunnelID+"/bitbucket/rest/api/1.0/projects", nil)
	req.Header.Set("Authorization", "Bearer "+scannerToken) // a scanner token is not the peer secret
	req.Header.Set("X-Ferry-Hop", "1")
	req.Header.Set("X-Ferry-Scanner", "appsec")
	if resp, err := client.Do(req); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("internal listener without the peer secret: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}

	// 2. The agent dies: B answers 503 tunnel_offline within a few seconds.
	agentProc.signal(syscall.SIGKILL)
	died := time.Now()
	waitFor(t, "503 via B", func() bool { code, _ := scannerGET(t, client, restOn(b)); return code == 503 })
	if took := time.Since(died); took > 5*time.Second {
		t.Errorf("B took %v to answer 503 after the agent died", took)
	}
	start := time.Now()
	code, body = scannerGET(t, client, restOn(b))
	if code != 503 || errorBody(t, body).Error != "tunnel_offline" || time.Since(start) > 2*time.Second {
		t.Fatalf("via B with no agent anywhere: %d %s in %v", code, body, time.Since(start))
	}

	// 3. Agent behind a load balancer over A and B: its two connections
	// spread, one on each.
	lb, err := testrig.StartBalancer(a.agentAddr, b.agentAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer lb.Close()
	agent2 := startProc(t, "agent2", agentBin, "--config", w.write("agent-lb.yaml", w.agentYAML(lb.Addr, "")))
	waitFor(t, "one connection on each of A and B", func() bool { return a.connections(t) == 1 && b.connections(t) == 1 })

	// Replica A restarts while a scanner on C keeps working.
	l := startLoad(t, 4, restOn(c))
	waitFor(t, "traffic via C", func() bool { return l.ok.Load() > 50 })
	a.proc.signal(syscall.SIGTERM)
	before := l.ok.Load()
	waitFor(t, "traffic via C while A is down", func() bool { return l.ok.Load() > before+50 })
	failedWhileDown := l.failed.Load()
	a.start(t, relayBin)
	before = l.ok.Load()
	waitFor(t, "traffic via C after A is back", func() bool { return l.ok.Load() > before+50 })
	l.finish()
	if failedWhileDown > 4 {
		t.Errorf("%d requests via C failed while A restarted; the agent's connection on B should have served them", failedWhileDown)
	}
	t.Logf("A restart: %d ok, %d failed via C", l.ok.Load(), l.failed.Load())

	// 4. Redis restarts mid-traffic: replicas holding the agent keep
	// serving; forwarding degrades to 503 and comes back by itself.
	holder := b
	if b.connections(t) == 0 {
		holder = a
	}
	lLocal := startLoad(t, 2, restOn(holder))
	defer lLocal.finish()
	waitFor(t, "local traffic", func() bool { return lLocal.ok.Load() > 20 })
	red.Stop()
	okBefore := lLocal.ok.Load()
	waitFor(t, "C degraded", func() bool { return strings.Contains(c.readyz(t), "degraded") })
	if r := c.readyz(t); !strings.HasPrefix(r, "200") {
		t.Fatalf("readyz while Redis is down: %s (degraded, but still ready)", r)
	}
	if page := getPage(t, "http://"+c.adminAddr+"/"); !strings.Contains(page, "degraded: redis") {
		t.Errorf("status page while Redis is down does not say degraded")
	}
	waitFor(t, "local traffic while Redis is down", func() bool { return lLocal.ok.Load() > okBefore+50 })
	code, body = scannerGET(t, client, restOn(c))
	if code != 503 || !strings.Contains(body, "registry") {
		t.Fatalf("via C while Redis is down: %d %s", code, body)
	}
	m := getMetrics(t, c.adminAddr)
	if !strings.Contains(m, "ferry_relay_registry_up 0") {
		t.Errorf("registry_up not 0 while Redis is down")
	}
	if err := red.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "forwarding back after Redis restart", func() bool { code, _ := scannerGET(t, client, restOn(c)); return code == 200 })
	waitFor(t, "C not degraded", func() bool { return c.readyz(t) == "200 ready\n" })
	if lLocal.failed.Load() > 0 {
		t.Errorf("%d requests to the replica holding the agent failed during the Redis restart:\n%s", lLocal.failed.Load(), lLocal.why())
	}

	// 5. Redis came back empty (no persistence here): a replica that
	// starts now must end up with the same peer secret as the others.
	if code := c.proc.signal(syscall.SIGTERM); code != 0 {
		t.Errorf("relay c exited %d", code)
	}
	c.start(t, relayBin)
	waitFor(t, "forwarding via a replica started after Redis lost its data", func() bool {
		code, _ := scannerGET(t, client, restOn(c))
		return code == 200
	})

	agent2.signal(syscall.SIGTERM)
	for _, rp := range []*replica{a, b, c} {
		if code := rp.proc.signal(syscall.SIGTERM); code != 0 {
			t.Errorf("relay %s exited %d", rp.name, code)
		}
	}
}

// TestPeerSecretRotation rotates the replicas' peer_secret_file under
// load, one replica at a time, as a rolling Secret update does: with
// two lines (send the first, accept either) not one forwarded request
// fails. Replicas that do not share a secret tell the scanner so in a
// 502, not a 401 that would blame its token, and say why in the log.
func TestPeerSecretRotation(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w, red := newWorld(t), startRedis(t)
	const oldS, newS = "old-peer-secret-0123456789", "new-peer-secret-0123456789"
	secA, secB := w.write("peer-a", oldS), w.write("peer-b", oldS)
	// rewrite replaces a replica's secret file (beside it, then renamed
	// over, as the README says to) and lets the replica's once-a-second
	// look at it pass.
	rewrite := func(path string, lines ...string) {
		t.Helper()
		next := path + ".next"
		if err := os.WriteFile(next, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(next, path); err != nil {
			t.Fatal(err)
		}
		time.Sleep(1200 * time.Millisecond)
	}
	a, b := newReplica(t, w, "a", red.URL(), secA), newReplica(t, w, "b", red.URL(), secB)
	a.start(t, relayBin)
	b.start(t, relayBin)
	agent := startProc(t, "agent", agentBin, "--config", w.write("agent.yaml", w.agentYAML(a.agentAddr, "")))
	waitFor(t, "two connections on A", func() bool { return a.connections(t) == 2 })
	viaB := "http://" + b.scannerAddr + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	client := newClient()
	defer client.CloseIdleConnections()
	waitFor(t, "B forwards to A", func() bool { code, _ := scannerGET(t, client, viaB); return code == 200 })

	l := startLoad(t, 4, viaB)
	more := func(what string) {
		t.Helper()
		before := l.ok.Load()
		waitFor(t, what, func() bool { return l.ok.Load() > before+50 })
	}
	more("traffic via B")
	rewrite(secA, newS, oldS) // A accepts the new one too
	more("traffic via B after A took both")
	rewrite(secB, newS, oldS) // B sends the new one
	more("traffic via B after B took both")
	rewrite(secA, newS)
	rewrite(secB, newS) // the old one is gone everywhere
	more("traffic via B after the old secret went")
	l.finish()
	if n := l.failed.Load(); n != 0 {
		t.Errorf("%d of %d requests via B failed during the rotation:\n%s", n, n+l.ok.Load(), l.why())
	}

	// B's secret is not A's: the scanner is told it is the relay's fault.
	rewrite(secB, "a-different-secret-0123456789")
	code, body := scannerGET(t, client, viaB)
	if code != http.StatusBadGateway || errorBody(t, body).Error != "upstream_error" || !strings.Contains(body, "do not share a peer secret") {
		t.Errorf("via B with a secret A does not know: %d %s", code, body)
	}
	b.proc.waitLog("replica holding the tunnel refused this replica's peer secret: every replica needs the same registry.peer_secret_file (during a rotation, both lines)")
	a.proc.waitLog("internal listener: request without the peer secret refused")
	if m := getMetrics(t, a.adminAddr); !strings.Contains(m, `ferry_relay_auth_failures_total{endpoint="peer"}`) {
		t.Errorf("A did not count the refused peer")
	}
	// A file rewritten into something unusable: forwarding stops, and
	// B's log says why; fixed, it forwards again without a restart.
	rewrite(secB, "short")
	code, body = scannerGET(t, client, viaB)
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "peer_secret_file unreadable") {
		t.Errorf("via B with a short secret: %d %s", code, body)
	}
	// (Its log arrives through a pipe, after the answer.)
	if m := b.proc.waitLog("peer secret unreadable; forwarding between replicas fails until it is fixed"); !strings.Contains(fmt.Sprint(m["err"]), "too short") {
		t.Errorf("B's log about its unreadable secret: %v", m)
	}
	rewrite(secB, newS)
	if code, body := scannerGET(t, client, viaB); code != 200 {
		t.Errorf("via B after its secret was fixed: %d %s", code, body)
	}

	agent.signal(syscall.SIGTERM)
	for _, rp := range []*replica{a, b} {
		if code := rp.proc.signal(syscall.SIGTERM); code != 0 {
			t.Errorf("relay %s exited %d", rp.name, code)
		}
	}
}

// TestReloadMoveIsNotRebalancedAway: with several replicas, a relay
// asks a second connection of one agent to reconnect elsewhere. The
// successor a reload opens must not be sent away so: the connection it
// replaces is drained at once, and the slot would be left with none. An
// agent with one connection, on replica A, moves (a new dial timeout,
// by SIGHUP) under load with no failed request.
func TestReloadMoveIsNotRebalancedAway(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w, red := newWorld(t), startRedis(t)
	a, b := newReplica(t, w, "a", red.URL(), ""), newReplica(t, w, "b", red.URL(), "")
	a.start(t, relayBin)
	b.start(t, relayBin)
	one := strings.Replace(w.agentYAML(a.agentAddr, ""), "  connections: 2\n", "  connections: 1\n", 1)
	cfg := w.write("agent.yaml", one)
	agent := startProc(t, "agent", agentBin, "--config", cfg)
	waitFor(t, "the connection on A", func() bool { return a.connections(t) == 1 })
	l := startLoad(t, 4, "http://"+a.scannerAddr+"/t/"+tunnelID+"/bitbucket/rest/api/1.0/projects/PROJ/repos/app")
	before := l.ok.Load()
	waitFor(t, "traffic", func() bool { return l.ok.Load() > before+100 })
	w.write("agent.yaml", one+"timeouts: {dial: 9s}\n")
	agent.cmd.Process.Signal(syscall.SIGHUP)
	agent.waitLog("config reloaded")
	before = l.ok.Load()
	waitFor(t, "traffic after the move", func() bool { return l.ok.Load() > before+100 })
	l.finish()
	if n := len(procLogs(agent, "reconnecting after goaway")); n != 0 {
		t.Errorf("the successor was sent away %d times", n)
	}
	if n := l.failed.Load(); n != 0 {
		t.Errorf("%d of %d requests failed while the connection moved:\n%s", n, n+l.ok.Load(), l.why())
	}
	agent.signal(syscall.SIGTERM)
	for _, rp := range []*replica{a, b} {
		if code := rp.proc.signal(syscall.SIGTERM); code != 0 {
			t.Errorf("relay %s exited %d", rp.name, code)
		}
	}
}
