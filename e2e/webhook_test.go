package e2e

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/agent"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/relay"
)

const webhookSecret = "bitbucket-webhook-secret-42"

// webhookWorld is a world plus a recording webhook target.
type webhookWorld struct {
	*world
	target    *testrig.WebhookTarget
	targetURL string
	spoolDir  string
	hookAddr  string // the agent's webhook listener, fixed across restarts
	client    *http.Client
}

func newWebhookWorld(t *testing.T) *webhookWorld {
	w := newWorld(t)
	target := &testrig.WebhookTarget{}
	ln := listenLocal(t)
	srv := &http.Server{Handler: target, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	hl := listenLocal(t)
	hookAddr := hl.Addr().String()
	hl.Close()
	w.write("webhook-secret", webhookSecret)
	client := newClient()
	t.Cleanup(client.CloseIdleConnections)
	return &webhookWorld{client: client, world: w, target: target, targetURL: "http://" + ln.Addr().String() + "/ferry/bitbucket",
		spoolDir: filepath.Join(w.dir, "spool"), hookAddr: hookAddr}
}

// relayConfig adds webhook_target to the test tunnel.
func (w *webhookWorld) relayConfig(agentAddr, scannerAddr string) string {
	y := w.relayYAMLWith(agentAddr, scannerAddr, "")
	return strings.Replace(y, "  - id: other\n", fmt.Sprintf("    webhook_target: %q\n  - id: other\n", w.targetURL), 1)
}

func (w *webhookWorld) agentConfig(relayAddr, extra string) string {
	return w.agentYAML(relayAddr, fmt.Sprintf("webhooks: {listen: %q, secret_file: %s, spool_dir: %s%s}\n",
		w.hookAddr, filepath.Join(w.dir, "webhook-secret"), w.spoolDir, extra))
}

// post sends a Bitbucket-shaped webhook; it returns the status and the
// delivery id the agent gave it.
func (w *webhookWorld) post(t *testing.T, event, secret string, body []byte) (int, string) {
	t.Helper()
	resp, err := w.client.Do(testrig.WebhookPost("http://"+w.hookAddr+"/bitbucket", event, secret, body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		DeliveryID string `json:"delivery_id"`
	}
	b, _ := io.ReadAll(resp.Body)
	json.Unmarshal(b, &out)
	if resp.StatusCode == http.StatusAccepted && (out.DeliveryID == "" || resp.Header.Get("X-Ferry-Delivery-Id") != out.DeliveryID) {
		t.Fatalf("202 without a delivery id: %s", b)
	}
	return resp.StatusCode, out.DeliveryID
}

func (w *webhookWorld) waitDelivered(t *testing.T, n int) []testrig.Received {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for len(w.target.Delivered()) < n {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d deliveries reached the target in 30s", len(w.target.Delivered()), n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return w.target.Delivered()
}

func agentStatus(t *testing.T, diag string) map[string]any {
	t.Helper()
	resp, err := newClientNoKeepAlive().Get("http://" + diag + "/v1/status")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st map[string]any
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func spoolFiles(t *testing.T, dir string) []string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, "*.delivery"))
	return m
}

// TestWebhooksThroughOutagesAndCrashes drives real relay and agent
// binaries: signature checks, a target answering 503, a relay outage, an
// agent kill -9 with a non-empty spool and a corrupt spool file. Every
// accepted delivery reaches the target, in order, with the id the agent
// answered Bitbucket with.
func TestWebhooksThroughOutagesAndCrashes(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWebhookWorld(t)
	// The restarted relay must come back on the same addresses.
	agentAddr, scannerAddr := stableAddr(t), stableAddr(t)
	fixedRelay := w.write("relay.yaml", w.relayConfig(agentAddr, scannerAddr))
	relayProc := startProc(t, "relay", relayBin, "--config", fixedRelay)
	relayProc.waitLog("relay started")
	agentCfg := w.write("agent.yaml", w.agentConfig(agentAddr, ""))
	agentProc := startProc(t, "agent", agentBin, "--config", agentCfg)
	diag := agentProc.waitLog("agent started")["diagnostics"].(string)
	agentProc.waitLog("webhook listener started")
	agentProc.waitLog("connected to relay")

	// 1. Forged, missing and wrong-algorithm signatures: 401, never spooled or forwarded.
	body := testrig.RefsChangedPayload("PROJ", "app", 0)
	if code, _ := w.post(t, "repo:refs_changed", "not-the-secret", body); code != http.StatusUnauthorized {
		t.Fatalf("forged signature: %d, want 401", code)
	}
	if code, _ := w.post(t, "repo:refs_changed", "", body); code != http.StatusUnauthorized {
		t.Fatalf("missing signature: %d, want 401", code)
	}
	req := testrig.WebhookPost("http://"+w.hookAddr+"/", "repo:refs_changed", webhookSecret, body)
	req.Body = io.NopCloser(bytes.NewReader(append(body, ' '))) // body altered after signing
	req.ContentLength++
	resp, err := w.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("altered body: %d, want 401", resp.StatusCode)
	}
	agentProc.waitLog("webhook refused")
	if m := getMetrics(t, diag); !strings.Contains(m, `ferry_agent_webhook_deliveries_refused_total{reason="signature"} 3`) {
		t.Fatalf("refused signatures not counted:\n%s", m)
	}

	// 2. A good delivery arrives with Bitbucket's headers and ferry's.
	code, id := w.post(t, "repo:refs_changed", webhookSecret, body)
	if code != http.StatusAccepted {
		t.Fatalf("signed delivery: %d, want 202", code)
	}
	got := w.waitDelivered(t, 1)[0]
	if got.DeliveryID != id || got.Header.Get("X-Ferry-Tunnel") != tunnelID || got.Header.Get("X-Event-Key") != "repo:refs_changed" ||
		got.Header.Get("X-Hub-Signature") != testrig.SignWebhook(webhookSecret, body) || !bytes.Equal(got.Body, body) ||
		got.Header.Get("X-Request-Id") == "" || !strings.HasPrefix(got.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("delivery at target: id %q (want %q), headers %v, body %q", got.DeliveryID, id, got.Header, got.Body)
	}
	if n := len(w.target.All()); n != 1 {
		t.Fatalf("target saw %d POSTs; forged ones must never be forwarded", n)
	}

	// 3. The target answers 503 three times: retried with the same id.
	w.target.FailNext(3)
	_, id2 := w.post(t, "pr:opened", webhookSecret, testrig.RefsChangedPayload("PROJ", "app", 1))
	w.waitDelivered(t, 2)
	var attempts int
	for _, r := range w.target.All() {
		if r.DeliveryID == id2 {
			attempts++
		}
	}
	if attempts != 4 {
		t.Fatalf("delivery %s reached the target %d times, want 3 failures and 1 success", id2, attempts)
	}
	// The target has the delivery before the agent hears so and removes
	// it from the spool; the outage below must find the spool empty.
	waitFor(t, "spool emptied", func() bool { return len(spoolFiles(t, w.spoolDir)) == 0 })

	// 4. Relay outage: deliveries are accepted and spooled, and all go
	// out in order once the relay is back.
	relayProc.signal(syscall.SIGTERM)
	var outage []string
	for i := range 5 {
		code, id := w.post(t, "repo:refs_changed", webhookSecret, testrig.RefsChangedPayload("OPS", "deploy-tools", 10+i))
		if code != http.StatusAccepted {
			t.Fatalf("delivery during relay outage: %d, want 202 (spooled)", code)
		}
		outage = append(outage, id)
	}
	if n := len(spoolFiles(t, w.spoolDir)); n != 5 {
		t.Fatalf("%d deliveries spooled during the outage, want 5", n)
	}
	relay2 := startProc(t, "relay2", relayBin, "--config", fixedRelay)
	relay2.waitLog("relay started")
	delivered := w.waitDelivered(t, 7)
	for i, want := range outage {
		if delivered[2+i].DeliveryID != want {
			t.Fatalf("after the outage delivery %d is %s, want %s (order per repository)", i, delivered[2+i].DeliveryID, want)
		}
	}
	waitFor(t, "spool emptied", func() bool { return len(spoolFiles(t, w.spoolDir)) == 0 })

	// 5. kill -9 the agent with deliveries spooled (the target is down),
	// and plant a corrupt file; the restarted agent quarantines it and
	// delivers the rest with their original ids.
	w.target.SetDown(true)
	seen := len(w.target.All())
	var crash []string
	for i := range 3 {
		_, id := w.post(t, "repo:refs_changed", webhookSecret, testrig.RefsChangedPayload("PROJ", "app", 20+i))
		crash = append(crash, id)
	}
	waitFor(t, "a failed attempt", func() bool { return len(w.target.All()) > seen })
	agentProc.signal(syscall.SIGKILL)
	if n := len(spoolFiles(t, w.spoolDir)); n != 3 {
		t.Fatalf("%d deliveries left in the spool after kill -9, want 3", n)
	}
	bad := filepath.Join(w.spoolDir, "0000000000000001-wh-0123456789abcdef01234567.delivery")
	if err := os.WriteFile(bad, []byte("FERRY-DELIVERY 1\n{\"id\":\"wh-0123456789abcdef01234567\",\"body_len\":99}\ntruncated"), 0o600); err != nil {
		t.Fatal(err)
	}
	w.target.SetDown(false)
	agent2 := startProc(t, "agent2", agentBin, "--config", agentCfg)
	diag = agent2.waitLog("agent started")["diagnostics"].(string)
	q := agent2.waitLog("webhook spool file is corrupt; moved to quarantine, the rest of the spool is delivered")
	if !strings.Contains(fmt.Sprint(q["reason"]), "truncated") {
		t.Fatalf("quarantine log does not say why: %v", q)
	}
	delivered = w.waitDelivered(t, 10)
	for i, want := range crash {
		if delivered[7+i].DeliveryID != want {
			t.Fatalf("after kill -9 delivery %d is %s, want %s", i, delivered[7+i].DeliveryID, want)
		}
	}
	if _, err := os.Stat(filepath.Join(w.spoolDir, "quarantine", filepath.Base(bad))); err != nil {
		t.Fatalf("corrupt file not in quarantine: %v", err)
	}
	// The file goes first, then the counts: wait for both.
	waitFor(t, "spool emptied", func() bool {
		st := agentStatus(t, diag)["webhooks"].(map[string]any)
		return len(spoolFiles(t, w.spoolDir)) == 0 && st["forwarded"].(float64) == 3
	})
	st := agentStatus(t, diag)["webhooks"].(map[string]any)
	sp := st["spool"].(map[string]any)
	if sp["quarantined"].(float64) != 1 || sp["spooled"].(float64) != 0 || st["forwarded"].(float64) != 3 {
		t.Fatalf("status after restart: %v", st)
	}
	out, err := exec.Command(agentBin, "status", "--addr", diag).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "3 delivered since start") || !strings.Contains(string(out), "0 waiting") ||
		!strings.Contains(string(out), "1 QUARANTINED") {
		t.Fatalf("ferry-agent status: %v\n%s", err, out)
	}
	m := getMetrics(t, diag)
	for _, want := range []string{"ferry_agent_webhook_spooled 0", "ferry_agent_webhook_quarantined_files 1", "ferry_agent_webhook_deliveries_forwarded_total 3"} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	// Nothing was delivered twice as a success, and every id is one the agent handed out.
	all := append(append([]string{id, id2}, outage...), crash...)
	for i, r := range w.target.Delivered() {
		if r.DeliveryID != all[i] {
			t.Fatalf("delivery %d has id %s, want %s", i, r.DeliveryID, all[i])
		}
	}
	agent2.signal(syscall.SIGTERM)
	relay2.signal(syscall.SIGTERM)
}

func newClientNoKeepAlive() *http.Client {
	return &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
}

// TestWebhookWithoutTargetWaitsForOne: a tunnel with no webhook_target
// yet keeps the delivery spooled (retried, never dropped) until a relay
// reload configures one, then it arrives.
func TestWebhookWithoutTargetWaitsForOne(t *testing.T) {
	w := newWebhookWorld(t)
	plain := w.relayYAML("127.0.0.1:0")
	w.write("relay.yaml", plain)
	r, rrun := w.startRelayYAML(plain)
	defer rrun.shutdown(t)
	a, arun := w.startAgentYAML(w.agentConfig(r.AgentAddr(), ", lanes: 1"))
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	if a.WebhookAddr() != w.hookAddr {
		t.Fatalf("webhook listener on %s, want %s", a.WebhookAddr(), w.hookAddr)
	}
	_, id := w.post(t, "repo:refs_changed", webhookSecret, testrig.RefsChangedPayload("PROJ", "app", 1))
	waitFor(t, "a refused attempt", func() bool {
		ws := a.Status().Webhooks
		return ws != nil && strings.Contains(ws.LastError, "no webhook_target")
	})
	if n := len(spoolFiles(t, w.spoolDir)); n != 1 {
		t.Fatalf("%d spooled, want the delivery kept", n)
	}
	w.write("relay.yaml", strings.Replace(plain, "  - id: other\n", fmt.Sprintf("    webhook_target: %q\n  - id: other\n", w.targetURL), 1))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	got := w.waitDelivered(t, 1)
	if got[0].DeliveryID != id {
		t.Fatalf("delivered %s, want %s", got[0].DeliveryID, id)
	}
	waitFor(t, "spool emptied", func() bool { return a.Status().Webhooks.Spool.Spooled == 0 })
	if v := testutilCounter(t, r, "no_target"); v < 1 {
		t.Fatalf("relay counted %v no_target deliveries", v)
	}
}

func testutilCounter(t *testing.T, r interface{ Metrics() *metrics.Relay }, result string) float64 {
	t.Helper()
	return testutil.ToFloat64(r.Metrics().Webhooks.WithLabelValues(tunnelID, result))
}

func getMetrics(t *testing.T, diag string) string {
	t.Helper()
	resp, err := newClientNoKeepAlive().Get("http://" + diag + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// heldDelivery runs a relay and an agent with one webhook lane, and
// posts one delivery, which the target takes and holds its answer to
// until release is called.
type heldDelivery struct {
	*webhookWorld
	relay              *relay.Relay
	agent              *agent.Agent
	relayRun, agentRun *running
	release            func()
}

func holdDelivery(t *testing.T) *heldDelivery {
	w := newWebhookWorld(t)
	y := w.relayConfig("127.0.0.1:0", "127.0.0.1:0")
	w.write("relay.yaml", y)
	h := &heldDelivery{webhookWorld: w}
	h.relay, h.relayRun = w.startRelayYAML(y)
	h.agent, h.agentRun = w.startAgentYAML(w.agentConfig(h.relay.AgentAddr(), ", lanes: 1"))
	waitFor(t, "agent connected", func() bool { return h.agent.Connected() == 2 })
	h.release = w.target.HoldAnswers()
	t.Cleanup(h.release)
	if code, _ := w.post(t, "repo:refs_changed", webhookSecret, testrig.RefsChangedPayload("PROJ", "app", 1)); code != http.StatusAccepted {
		t.Fatalf("delivery: %d, want 202", code)
	}
	waitFor(t, "the target holding the delivery", func() bool { return len(w.target.All()) == 1 })
	return h
}

// stopped waits for a daemon stopped with run.stop to end cleanly.
func stopped(t *testing.T, what string, run *running) {
	t.Helper()
	select {
	case err := <-run.done:
		if err != nil {
			t.Fatalf("%s shutdown: %v", what, err)
		}
	case <-time.After(40 * time.Second):
		t.Fatalf("%s did not stop", what)
	}
}

// TestRelayShutdownLetsWebhookDeliveriesFinish: a delivery the target has
// taken but not yet answered when the relay is told to stop is answered
// within the shutdown grace, so the agent drops it from its spool instead
// of sending it to the target a second time.
func TestRelayShutdownLetsWebhookDeliveriesFinish(t *testing.T) {
	h := holdDelivery(t)
	defer h.agentRun.shutdown(t)
	h.relayRun.stop()
	waitFor(t, "relay shutting down", func() bool {
		c, err := net.DialTimeout("tcp", h.relay.AgentAddr(), time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil // the agent listener closes first
	})
	time.Sleep(200 * time.Millisecond) // the delivery must outlast the start of shutdown, not race it
	h.release()
	stopped(t, "relay", h.relayRun)
	// The file goes first, then the count: wait for both.
	waitFor(t, "the delivery confirmed to the agent", func() bool {
		st := h.agent.Status().Webhooks
		return st.Forwarded == 1 && st.Spool.Spooled == 0 && len(spoolFiles(t, h.spoolDir)) == 0
	})
	if n := len(h.target.All()); n != 1 {
		t.Fatalf("target got %d POSTs, want the delivery once", n)
	}
}

// TestAgentShutdownLetsWebhookDeliveriesFinish: the agent's drain waits
// for a forwarding attempt in flight (its stream is one the relay has not
// closed yet; see Agent.settled), so a delivery the target has taken is
// not sent to it again after the restart.
func TestAgentShutdownLetsWebhookDeliveriesFinish(t *testing.T) {
	h := holdDelivery(t)
	defer h.relayRun.shutdown(t)
	h.agentRun.stop()
	time.Sleep(200 * time.Millisecond) // the attempt must outlast the start of the drain, not race it
	h.release()
	stopped(t, "agent", h.agentRun)
	if n := len(spoolFiles(t, h.spoolDir)); n != 0 {
		t.Fatalf("%d deliveries left in the spool; the target has the only one", n)
	}
	if n := len(h.target.All()); n != 1 {
		t.Fatalf("target got %d POSTs, want the delivery once", n)
	}
}

// TestWebhookListenerOverTLS: with webhooks.tls Bitbucket posts over
// HTTPS, plain HTTP is refused, status and doctor show the certificate,
// and a reload serves renewed files.
func TestWebhookListenerOverTLS(t *testing.T) {
	w := newWebhookWorld(t)
	y := w.relayConfig("127.0.0.1:0", "127.0.0.1:0")
	w.write("relay.yaml", y)
	r, rrun := w.startRelayYAML(y)
	defer rrun.shutdown(t)
	// Files of its own (the relay serves the world's), renewed below.
	hookCert, hookKey := filepath.Join(w.dir, "hook-cert.pem"), filepath.Join(w.dir, "hook-key.pem")
	for from, to := range map[string]string{w.pki.CertFile: hookCert, w.pki.KeyFile: hookKey} {
		if err := testrig.ReplaceFile(from, to); err != nil {
			t.Fatal(err)
		}
	}
	tlsCfg := fmt.Sprintf(", tls: {cert_file: %s, key_file: %s}", hookCert, hookKey)
	agentYAML := w.agentConfig(r.AgentAddr(), tlsCfg)
	w.write("agent.yaml", agentYAML)
	a, arun := w.startAgentYAML(agentYAML)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })

	https := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: w.pki.Pool}}}
	defer https.CloseIdleConnections()
	body := testrig.RefsChangedPayload("PROJ", "app", 1)
	resp, err := https.Do(testrig.WebhookPost("https://"+w.hookAddr+"/bitbucket", "repo:refs_changed", webhookSecret, body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("delivery over HTTPS: %d", resp.StatusCode)
	}
	w.waitDelivered(t, 1)
	if code, _ := w.post(t, "repo:refs_changed", webhookSecret, body); code == http.StatusAccepted {
		t.Fatal("a plain HTTP delivery was accepted by an HTTPS listener")
	}
	st := a.Status().Webhooks.TLS
	if st == nil || !st.NotAfter.Equal(w.pki.Cert.Leaf.NotAfter) || st.Problem != "" {
		t.Fatalf("status TLS: %+v", st)
	}
	if page := getPage(t, "http://"+a.DiagAddr()+"/"); !strings.Contains(page, "HTTPS; certificate valid until") {
		t.Error("status page does not show the webhook listener's certificate")
	}
	if ok, out := runDoctor(t, w.world, agentYAML); !strings.HasPrefix(line(out, "webhook tls"), "✓") || !strings.Contains(line(out, "webhook tls"), "days left") {
		t.Errorf("doctor (ok %v):\n%s", ok, out)
	}

	// Renewed files, picked up by a reload (or within a minute without).
	renewed, err := testrig.NewPKIFor(t.TempDir(), 60*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for from, to := range map[string]string{renewed.CertFile: hookCert, renewed.KeyFile: hookKey} {
		if err := testrig.ReplaceFile(from, to); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	c, err := tls.Dial("tcp", w.hookAddr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if !bytes.Equal(c.ConnectionState().PeerCertificates[0].Raw, renewed.Cert.Certificate[0]) {
		t.Fatal("the renewed certificate is not served after a reload")
	}
}

// TestWebhookTargetToken: with webhook_token_file the relay sends the
// target a token of its own, so the target can refuse POSTs from anyone
// else. A target that turned to a new token first refuses deliveries
// (kept spooled, retried, none lost) until the relay's file has it too,
// which takes no reload.
func TestWebhookTargetToken(t *testing.T) {
	w := newWebhookWorld(t)
	tokenFile := w.write("hook-token", "hook-token-1")
	y := strings.Replace(w.relayConfig("127.0.0.1:0", "127.0.0.1:0"), "  - id: other\n", "    webhook_token_file: "+tokenFile+"\n  - id: other\n", 1)
	r, rrun := w.startRelayYAML(y)
	defer rrun.shutdown(t)
	a, arun := w.startAgentYAML(w.agentConfig(r.AgentAddr(), ", lanes: 1"))
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })

	w.target.RequireToken("hook-token-1")
	_, first := w.post(t, "repo:refs_changed", webhookSecret, testrig.RefsChangedPayload("PROJ", "app", 1))
	got := w.waitDelivered(t, 1)
	if got[0].DeliveryID != first || got[0].Header.Get("Authorization") != "Bearer hook-token-1" {
		t.Fatalf("first delivery %s with Authorization %q", got[0].DeliveryID, got[0].Header.Get("Authorization"))
	}

	w.target.RequireToken("hook-token-2")
	_, second := w.post(t, "repo:refs_changed", webhookSecret, testrig.RefsChangedPayload("PROJ", "app", 2))
	waitFor(t, "the target refusing the old token", func() bool {
		for _, rc := range w.target.All() {
			if rc.DeliveryID == second && rc.Status == http.StatusUnauthorized {
				return true
			}
		}
		return false
	})
	if n := len(spoolFiles(t, w.spoolDir)); n != 1 {
		t.Fatalf("%d spooled while the target refused the token, want the delivery kept", n)
	}
	waitFor(t, "the agent to show the refusal", func() bool {
		ws := a.Status().Webhooks
		return ws != nil && strings.Contains(ws.LastError, "401")
	})
	w.write("hook-token", "hook-token-2")
	got = w.waitDelivered(t, 2)
	if got[1].DeliveryID != second || got[1].Header.Get("Authorization") != "Bearer hook-token-2" {
		t.Fatalf("second delivery %s with Authorization %q", got[1].DeliveryID, got[1].Header.Get("Authorization"))
	}
	waitFor(t, "spool emptied", func() bool { return a.Status().Webhooks.Spool.Spooled == 0 })

	// An unreadable file: the relay says so, the delivery waits.
	os.Remove(tokenFile)
	time.Sleep(1100 * time.Millisecond) // the relay looks at the file at most once a second
	_, third := w.post(t, "repo:refs_changed", webhookSecret, testrig.RefsChangedPayload("PROJ", "app", 3))
	waitFor(t, "the relay's refusal", func() bool {
		ws := a.Status().Webhooks
		return ws != nil && strings.Contains(ws.LastError, "webhook_token_file")
	})
	w.write("hook-token", "hook-token-2")
	if got := w.waitDelivered(t, 3); got[2].DeliveryID != third {
		t.Fatalf("third delivery %s, want %s", got[2].DeliveryID, third)
	}
}

// TestWebhookSettingsReload: the webhook secret and limits change on
// SIGHUP (the listener, spool and lanes need a restart).
func TestWebhookSettingsReload(t *testing.T) {
	w := newWebhookWorld(t)
	plain := w.relayYAML("127.0.0.1:0") // no webhook_target: deliveries stay spooled
	r, rrun := w.startRelayYAML(plain)
	defer rrun.shutdown(t)
	cfg := func(extra string) string { return w.write("agent.yaml", w.agentConfig(r.AgentAddr(), extra)) }
	cfg(", spool_max_deliveries: 2")
	a, arun := w.startAgentYAML(w.agentConfig(r.AgentAddr(), ", spool_max_deliveries: 2"))
	defer arun.shutdown(t)
	reload := func(extra string) {
		t.Helper()
		cfg(extra)
		if err := a.Reload(); err != nil {
			t.Fatal(err)
		}
	}
	body := testrig.RefsChangedPayload("PROJ", "app", 1)
	post := func(secret string) int {
		t.Helper()
		status, _ := w.post(t, "repo:refs_changed", secret, body)
		return status
	}
	for i := range 2 {
		if s := post(webhookSecret); s != http.StatusAccepted {
			t.Fatalf("delivery %d: %d", i, s)
		}
	}
	if s := post(webhookSecret); s != http.StatusServiceUnavailable {
		t.Fatalf("a third delivery into a spool of 2: %d, want 503", s)
	}
	reload(", spool_max_deliveries: 5")
	if s := post(webhookSecret); s != http.StatusAccepted {
		t.Fatalf("after raising spool_max_deliveries to 5: %d", s)
	}
	if st := a.Status().Webhooks; st == nil || st.Spool.MaxCount != 5 || st.Spool.Spooled != 3 {
		t.Fatalf("spool after the reload: %+v", st)
	}
	// A new secret, in a file of a new name.
	const rotated = "rotated-webhook-secret-43"
	w.write("webhook-secret-2", rotated)
	y := strings.Replace(w.agentConfig(r.AgentAddr(), ", spool_max_deliveries: 5, max_body_kb: 1"), filepath.Join(w.dir, "webhook-secret"), filepath.Join(w.dir, "webhook-secret-2"), 1)
	w.write("agent.yaml", y)
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	if s := post(webhookSecret); s != http.StatusUnauthorized {
		t.Errorf("signed with the old secret after the rotation: %d, want 401", s)
	}
	if s := post(rotated); s != http.StatusAccepted {
		t.Errorf("signed with the new secret: %d, want 202", s)
	}
	if s, _ := w.post(t, "repo:refs_changed", rotated, bytes.Repeat([]byte("x"), 2048)); s != http.StatusRequestEntityTooLarge {
		t.Errorf("a 2 KiB body after max_body_kb was lowered to 1: %d, want 413", s)
	}
}
