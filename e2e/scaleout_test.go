package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
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

func newReplica(t *testing.T, w *world, name, redisURL string) *replica {
	rp := &replica{name: name, agentAddr: stableAddr(t), scannerAddr: stableAddr(t), adminAddr: stableAddr(t), peer: stableAddr(t)}
	y := w.relayYAMLWith(rp.agentAddr, rp.scannerAddr, "")
	y = strings.Replace(y, `admin_listen: "127.0.0.1:0"`, fmt.Sprintf("admin_listen: %q", rp.adminAddr), 1)
	y += fmt.Sprintf("registry: {backend: redis, redis_url: %q, advertise_url: \"http://%s\"}\n", redisURL, rp.peer)
	rp.cfg = w.write("relay-"+name+".yaml", y)
	return rp
}

func (rp *replica) start(t *testing.T, bin string) {
	rp.proc = startProc(t, "relay-"+rp.name, bin, "--config", rp.cfg)
	rp.proc.waitLog("relay started")
}

// connections is how many agent connections the replica holds for the test tunnel.
func (rp *replica) connections(t *testing.T) int {
	resp, err := newClientNoKeepAlive().Get("http://" + rp.adminAddr + "/v1/tunnels")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	var ts []struct {
		ID          string `json:"id"`
		Connections []struct {
			Draining bool `json:"draining"`
		} `json:"connections"`
	}
	json.NewDecoder(resp.Body).Decode(&ts)
	for _, tu := range ts {
		if tu.ID == tunnelID {
			n := 0
			for _, c := range tu.Connections {
				if !c.Draining {
					n++
				}
			}
			return n
		}
	}
	return 0
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
	w := newWorld(t)
	red, err := testrig.StartRedis(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(red.Stop)
	a, b, c := newReplica(t, w, "a", red.URL()), newReplica(t, w, "b", red.URL()), newReplica(t, w, "c", red.URL())
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
		t.Errorf("%d requests to the replica holding the agent failed during the Redis restart", lLocal.failed.Load())
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
