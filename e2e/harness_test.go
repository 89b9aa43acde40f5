// Package e2e runs relay, agent and a Bitbucket stand-in together, in one
// process and as real binaries, and checks what a scanner and an operator
// would see.
package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ferry-tunnel/ferry/agent"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/internal/token"
	"github.com/ferry-tunnel/ferry/relay"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	removeBinaries()
	os.Exit(code)
}

const (
	agentToken   = "fry_agent-token-for-tests-0001"
	scannerToken = "fry_scanner-token-for-tests-01"
	otherScanner = "fry_scanner-on-other-tunnel-1"
	bitbucketPAT = "bbpat-secret-0123456789"
	tunnelID     = "acme-bbdc"
)

// world is the fixed part of a test setup: PKI, repositories, Bitbucket.
type world struct {
	t     testing.TB
	dir   string
	pki   *testrig.PKI
	bb    *testrig.Bitbucket
	bbURL string
}

func newWorld(t testing.TB) *world {
	t.Helper()
	dir := t.TempDir()
	pki, err := testrig.NewPKI(dir)
	if err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(dir, "git")
	for _, r := range []struct {
		proj, slug string
		commits    int
	}{{"PROJ", "app", 5}, {"OPS", "deploy-tools", 2}, {"SECRET", "vault", 1}} {
		if _, err := testrig.MakeRepo(root, r.proj, r.slug, r.commits); err != nil {
			t.Fatal(err)
		}
	}
	bb := &testrig.Bitbucket{GitRoot: root, Token: bitbucketPAT, User: "svc-ferry"}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: bb, TLSConfig: pki.ServerTLS(), ReadHeaderTimeout: 10 * time.Second}
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	w := &world{t: t, dir: dir, pki: pki, bb: bb, bbURL: "https://" + ln.Addr().String()}
	w.write("relay-token", agentToken)
	w.write("pat", bitbucketPAT)
	return w
}

// serveUpstream serves h over TLS (the test PKI) on loopback until the
// test ends, and returns its https URL.
func (w *world) serveUpstream(h http.Handler) string {
	ln := listenLocal(w.t)
	srv := &http.Server{Handler: h, TLSConfig: w.pki.ServerTLS(), ReadHeaderTimeout: 10 * time.Second}
	go srv.ServeTLS(ln, "", "")
	w.t.Cleanup(func() { srv.Close() })
	return "https://" + ln.Addr().String()
}

// upstreamYAML is an agent's upstreams entry for url, trusting the test
// PKI, with the test PAT and the read profile; extra is added as is
// ("    response_timeout: 1s\n").
func (w *world) upstreamYAML(name, url, extra string) string {
	return "  - name: " + name + "\n    url: " + url + "\n    ca_file: " + w.pki.CAFile +
		"\n    auth: {type: bearer, token_file: " + filepath.Join(w.dir, "pat") + "}\n    profile: bitbucket-dc-read\n" + extra
}

func (w *world) write(name, body string) string {
	p := filepath.Join(w.dir, name)
	if err := os.WriteFile(p, []byte(body+"\n"), 0o600); err != nil {
		w.t.Fatal(err)
	}
	return p
}

// relayYAML is a relay config listening on agentAddr (":0" style allowed).
func (w *world) relayYAML(agentAddr string) string {
	return w.relayYAMLWith(agentAddr, "127.0.0.1:0", "")
}

// relayYAMLWith also fixes the scanner address and adds top-level YAML.
func (w *world) relayYAMLWith(agentAddr, scannerAddr, extra string) string {
	return extra + fmt.Sprintf(`agent_listen: %q
tls: {cert_file: %s, key_file: %s}
scanner_listen: %q
admin_listen: "127.0.0.1:0"
log: {level: debug}
tunnels:
  - id: %s
    agent_tokens: [%q, %q]
  - id: other
    agent_tokens: [%q]
scanners:
  - name: appsec
    token: %q
    tunnels: [%s]
  - name: elsewhere
    token: %q
    tunnels: [other]
`, agentAddr, w.pki.CertFile, w.pki.KeyFile, scannerAddr, tunnelID, token.Of("rotated-out").String(), token.Of(agentToken).String(),
		token.Of("other-agent").String(), token.Of(scannerToken).String(), tunnelID, token.Of(otherScanner).String())
}

func (w *world) agentYAML(relayAddr string, extra string) string {
	return fmt.Sprintf(`agent_id: test-agent
relay:
  url: wss://%s/v1/connect
  token_file: %s
  ca_file: %s
  connections: 2
upstreams:
  - name: bitbucket
    url: %s
    ca_file: %s
    auth: {type: bearer, token_file: %s}
    profile: bitbucket-dc-read
    response_timeout: 5s
%sdiagnostics: {listen: "127.0.0.1:0"}
audit: {path: %s}
log: {level: debug}
`, relayAddr, filepath.Join(w.dir, "relay-token"), w.pki.CAFile, w.bbURL, w.pki.CAFile, filepath.Join(w.dir, "pat"), extra, filepath.Join(w.dir, "audit.jsonl"))
}

// running is a relay or agent started in-process.
type running struct {
	stop func()
	done chan error
}

func (r *running) shutdown(t testing.TB) {
	t.Helper()
	r.stop()
	select {
	case err := <-r.done:
		if err != nil {
			t.Errorf("shutdown: %v", err)
		}
	case <-time.After(40 * time.Second):
		t.Fatal("did not shut down within 40s")
	}
}

func testLog(t testing.TB) io.Writer {
	if testing.Verbose() {
		return os.Stderr
	}
	return io.Discard
}

func (w *world) startRelay(agentAddr string) (*relay.Relay, *running) {
	w.t.Helper()
	return w.startRelayYAML(w.relayYAML(agentAddr))
}

func (w *world) startRelayYAML(yaml string) (*relay.Relay, *running) {
	w.t.Helper()
	return w.startRelayLogged(yaml, testLog(w.t))
}

// startRelayLogged runs a relay on yaml that logs to out.
func (w *world) startRelayLogged(yaml string, out io.Writer) (*relay.Relay, *running) {
	w.t.Helper()
	cfg, err := config.ParseRelay(filepath.Join(w.dir, "relay.yaml"), []byte(yaml))
	if err != nil {
		w.t.Fatal(err)
	}
	r, err := relay.New(cfg, logging.New(out, cfg.Log).With("side", "relay"))
	if err != nil {
		w.t.Fatal(err)
	}
	if err := r.Listen(); err != nil {
		w.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	run := &running{stop: cancel, done: make(chan error, 1)}
	go func() { run.done <- r.Serve(ctx) }()
	return r, run
}

func (w *world) startAgent(relayAddr, extra string) (*agent.Agent, *running) {
	w.t.Helper()
	return w.startAgentYAML(w.agentYAML(relayAddr, extra))
}

// startAgentYAML runs an agent on yaml. Its config file name is the
// world's agent.yaml, which Reload re-reads.
func (w *world) startAgentYAML(yaml string) (*agent.Agent, *running) {
	w.t.Helper()
	return w.startAgentLogged(yaml, testLog(w.t))
}

// startAgentLogged runs an agent on yaml that logs to out.
func (w *world) startAgentLogged(yaml string, out io.Writer) (*agent.Agent, *running) {
	w.t.Helper()
	cfg, err := config.ParseAgent(filepath.Join(w.dir, "agent.yaml"), []byte(yaml))
	if err != nil {
		w.t.Fatal(err)
	}
	a, err := agent.New(cfg, logging.New(out, cfg.Log).With("side", "agent"))
	if err != nil {
		w.t.Fatal(err)
	}
	if err := a.Listen(); err != nil {
		w.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	run := &running{stop: cancel, done: make(chan error, 1)}
	go func() { run.done <- a.Serve(ctx) }()
	return a, run
}

// env is a whole running setup.
type env struct {
	*world
	relay       *relay.Relay
	agent       *agent.Agent
	relayRun    *running
	agentRun    *running
	client      *http.Client
	scannerBase string // http://relay-scanner/t/acme-bbdc/bitbucket
}

func newEnv(t testing.TB) *env {
	w := newWorld(t)
	e := &env{world: w, client: &http.Client{Transport: &http.Transport{}}}
	e.relay, e.relayRun = w.startRelay("127.0.0.1:0")
	e.agent, e.agentRun = w.startAgent(e.relay.AgentAddr(), "")
	e.scannerBase = "http://" + e.relay.ScannerAddr() + "/t/" + tunnelID + "/bitbucket"
	t.Cleanup(func() {
		e.client.CloseIdleConnections()
		e.agentRun.shutdown(t)
		e.relayRun.shutdown(t)
	})
	waitFor(t, "agent connected", func() bool { return e.agent.Connected() == 2 })
	return e
}

// waitCredentialCheck waits for the agent's start-up credential check,
// whose requests to Bitbucket would otherwise mix with a test's.
func waitCredentialCheck(t *testing.T, a *agent.Agent) {
	t.Helper()
	waitFor(t, "credential check", func() bool { return len(a.Status().Credentials) > 0 })
}

func tokenHash(tok string) string { return token.Of(tok).String() }

func newClient() *http.Client { return &http.Client{Transport: &http.Transport{}} }

// waitFor polls cond every 20 ms for at most 15 s.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// get sends a scanner request and returns status, headers and body.
func (e *env) do(method, url, tok string, body io.Reader, hdr map[string]string) (int, http.Header, string) {
	e.t.Helper()
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		e.t.Fatal(err)
	}
	if tok != "" {
		req.Header.Set("Authorization", "Bearer "+tok)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := e.client.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, resp.Header, string(b)
}

// git runs git with the scanner token as an extra header.
func gitCmd(t *testing.T, dir, tok string, args ...string) string {
	t.Helper()
	full := append([]string{"-c", "http.extraHeader=Authorization: Bearer " + tok}, args...)
	out, err := testrig.Git(dir, full...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

func listenLocal(t testing.TB) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}

// stableAddr is a free loopback address a restarted server can come back
// on (see testrig.StableAddr).
func stableAddr(t testing.TB) string {
	t.Helper()
	addr, err := testrig.StableAddr()
	if err != nil {
		t.Fatal(err)
	}
	return addr
}

// removeBinaries is replaced by the binary-level tests' cleanup.
var removeBinaries = func() {}

// relayConn is one agent connection as the relay's /v1/tunnels shows it.
type relayConn struct {
	ID       string `json:"id"`
	InFlight int64  `json:"in_flight"`
	Draining bool   `json:"draining"`
}

// relayConns lists the agent connections a relay (by its admin address)
// holds for the test tunnel.
func relayConns(adminAddr string) ([]relayConn, error) {
	resp, err := newClientNoKeepAlive().Get("http://" + adminAddr + "/v1/tunnels")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var ts []struct {
		ID          string      `json:"id"`
		Connections []relayConn `json:"connections"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&ts); err != nil {
		return nil, fmt.Errorf("relay /v1/tunnels: %w", err)
	}
	for _, tu := range ts {
		if tu.ID == tunnelID {
			return tu.Connections, nil
		}
	}
	return nil, nil
}

// download is the outcome of a GET read to its end.
type download struct {
	sum  []byte // sha256 of the body
	n    int64
	code int
	err  error
}

// startDownload GETs url as the test scanner and returns once the
// response's headers arrived (or the request failed); the channel gets
// the outcome when the body was read.
func startDownload(url string) <-chan download {
	dl, headers := make(chan download, 1), make(chan struct{})
	go func() {
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("Authorization", "Bearer "+scannerToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			close(headers)
			dl <- download{err: err}
			return
		}
		defer resp.Body.Close()
		close(headers)
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		dl <- download{sum: h.Sum(nil), n: n, code: resp.StatusCode, err: err}
	}()
	<-headers
	return dl
}

// check fails t unless d is syn's body, whole.
func (d download) check(t *testing.T, what string, syn testrig.Synthetic) {
	t.Helper()
	want := sha256.New()
	io.Copy(want, syn.Reader())
	if d.err != nil || d.code != 200 || d.n != syn.Size || !bytes.Equal(d.sum, want.Sum(nil)) {
		t.Errorf("%s: %d, %d of %d bytes, %v", what, d.code, d.n, syn.Size, d.err)
	}
}
