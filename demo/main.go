// Command demo runs a complete local ferry: a Bitbucket-shaped upstream
// (real git over `git http-backend`, Bitbucket REST shapes, behind TLS),
// the real ferry-relay and ferry-agent binaries with TLS between them, and
// a scanner that clones and calls the REST API through the tunnel. It
// prints each step and exits 0 when everything worked. `make demo` runs it.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func main() {
	bin := flag.String("bin", "bin", "directory holding ferry-relay and ferry-agent")
	keep := flag.Bool("keep", false, "keep the work directory (configs, logs, audit) for a look afterwards")
	flag.Parse()
	if err := run(*bin, *keep); err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo FAILED: %v\n", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("\n==> "+format+"\n", args...) }
func show(format string, args ...any) { fmt.Printf("    "+format+"\n", args...) }

func run(bin string, keep bool) error {
	relayBin, agentBin := filepath.Join(bin, "ferry-relay"), filepath.Join(bin, "ferry-agent")
	for _, b := range []string{relayBin, agentBin} {
		if _, err := os.Stat(b); err != nil {
			return fmt.Errorf("%s not found: run `make build` first", b)
		}
	}
	dir, err := os.MkdirTemp("", "ferry-demo-")
	if err != nil {
		return err
	}
	if keep {
		defer fmt.Printf("\nwork directory kept: %s\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}

	step("Private network: a Bitbucket Data Center stand-in with real git repositories (TLS, private CA)")
	pki, err := testrig.NewPKI(dir)
	if err != nil {
		return err
	}
	gitRoot := filepath.Join(dir, "bitbucket")
	for _, r := range []struct {
		proj, slug string
		n          int
	}{{"PROJ", "payments", 12}, {"OPS", "deploy-tools", 3}} {
		if _, err := testrig.MakeRepo(gitRoot, r.proj, r.slug, r.n); err != nil {
			return err
		}
		show("repository %s/%s with %d commits", r.proj, r.slug, r.n)
	}
	pat := "demo-bitbucket-pat-" + fmt.Sprint(time.Now().UnixNano())
	bb := &testrig.Bitbucket{GitRoot: gitRoot, Token: pat, User: "svc-ferry"}
	bbLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	bbSrv := &http.Server{Handler: bb, TLSConfig: pki.ServerTLS(), ReadHeaderTimeout: 10 * time.Second}
	go bbSrv.ServeTLS(bbLn, "", "")
	defer bbSrv.Close()
	bbURL := "https://" + bbLn.Addr().String()
	show("Bitbucket at %s (the cloud cannot reach it)", bbURL)

	step("Tokens: `ferry-relay token` makes each; the relay config keeps only the sha256 form")
	agentTok, agentHash, err := newToken(relayBin)
	if err != nil {
		return err
	}
	scanTok, scanHash, err := newToken(relayBin)
	if err != nil {
		return err
	}
	show("agent token   %s…  → %s…", agentTok[:10], agentHash[:20])
	show("scanner token %s…  → %s…", scanTok[:10], scanHash[:20])

	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(body), 0o600)
		return p
	}
	write("relay-token", agentTok+"\n")
	write("bitbucket-pat", pat+"\n")
	write("webhook-secret", "demo-webhook-secret\n")
	// The cloud endpoint that receives Bitbucket's webhooks.
	target := &testrig.WebhookTarget{}
	tln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	tsrv := &http.Server{Handler: target, ReadHeaderTimeout: 5 * time.Second}
	go tsrv.Serve(tln)
	defer tsrv.Close()
	relayCfg := write("relay.yaml", fmt.Sprintf(`# cloud side
agent_listen: "127.0.0.1:0"
tls: {cert_file: %s, key_file: %s}
scanner_listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
tunnels:
  - id: acme-bbdc
    agent_tokens: [%q]
    webhook_target: http://%s/hooks/bitbucket
scanners:
  - name: appsec-scanner
    token: %q
    tunnels: [acme-bbdc]
`, pki.CertFile, pki.KeyFile, agentHash, tln.Addr(), scanHash))

	step("Cloud: start ferry-relay")
	relay, err := startDaemon(relayBin, relayCfg, filepath.Join(dir, "relay.log"))
	if err != nil {
		return err
	}
	defer relay.stop()
	started, err := relay.waitFor("relay started")
	if err != nil {
		return err
	}
	agentAddr, scannerAddr := started["agent_listen"].(string), started["scanner_listen"].(string)
	show("agents dial wss://%s/v1/connect; scanners call http://%s/t/...", agentAddr, scannerAddr)

	agentCfg := write("agent.yaml", fmt.Sprintf(`# private side: only outbound connections
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
    repositories: ["PROJ/*"]
diagnostics: {listen: "127.0.0.1:0"}
audit: {path: %s}
webhooks: {listen: "127.0.0.1:0", secret_file: %s, spool_dir: %s}
`, agentAddr, filepath.Join(dir, "relay-token"), pki.CAFile, bbURL, pki.CAFile, filepath.Join(dir, "bitbucket-pat"), filepath.Join(dir, "audit.jsonl"),
		filepath.Join(dir, "webhook-secret"), filepath.Join(dir, "spool")))

	step("Private network: `ferry-agent doctor` checks everything before the agent starts")
	out, err := exec.Command(agentBin, "doctor", "--config", agentCfg).CombinedOutput()
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		show("%s", l)
	}
	if err != nil {
		return fmt.Errorf("doctor found problems: %v", err)
	}

	step("Private network: start ferry-agent (it dials out; nothing dials in)")
	agent, err := startDaemon(agentBin, agentCfg, filepath.Join(dir, "agent.log"))
	if err != nil {
		return err
	}
	defer agent.stop()
	astart, err := agent.waitFor("agent started")
	if err != nil {
		return err
	}
	diag := astart["diagnostics"].(string)
	if err := waitReady(diag); err != nil {
		return err
	}
	out, _ = exec.Command(agentBin, "status", "--addr", diag).CombinedOutput()
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		show("%s", l)
	}

	base := "http://" + scannerAddr + "/t/acme-bbdc/bitbucket"
	step("Scanner: git clone through the tunnel")
	clone := filepath.Join(dir, "payments")
	show("$ git -c http.extraHeader=\"Authorization: Bearer $T\" clone %s/scm/proj/payments.git", base)
	if _, err := testrig.Git("", "-c", "http.extraHeader=Authorization: Bearer "+scanTok, "clone", "-q", base+"/scm/proj/payments.git", clone); err != nil {
		return err
	}
	log, _ := testrig.Git(clone, "log", "--oneline", "-3")
	count, _ := testrig.Git(clone, "rev-list", "--count", "HEAD")
	show("cloned %s commits; latest:", strings.TrimSpace(count))
	for _, l := range strings.Split(strings.TrimSpace(log), "\n") {
		show("  %s", l)
	}

	step("Scanner: REST call through the tunnel")
	show("$ curl -H \"Authorization: Bearer $T\" %s/rest/api/1.0/projects/PROJ/repos", base)
	status, body, rid, err := get(base+"/rest/api/1.0/projects/PROJ/repos", scanTok)
	if err != nil {
		return err
	}
	if status != 200 {
		return fmt.Errorf("REST call answered %d: %s", status, body)
	}
	var page struct {
		Values []struct {
			Slug    string               `json:"slug"`
			Project struct{ Key string } `json:"project"`
		} `json:"values"`
	}
	json.Unmarshal([]byte(body), &page)
	for _, v := range page.Values {
		show("%d OK: repository %s/%s   (X-Ferry-Request-Id %s)", status, v.Project.Key, v.Slug, rid)
	}

	step("Policy: what the agent refuses never reaches Bitbucket")
	seenBefore := len(bb.Seen())
	for _, c := range []struct{ method, path, why string }{
		{"POST", "/scm/proj/payments.git/git-receive-pack", "a push (profile bitbucket-dc-read)"},
		{"GET", "/rest/api/1.0/projects/OPS/repos/deploy-tools", "a repository outside repositories: [PROJ/*]"},
		{"GET", "/rest/api/1.0/projects/PROJ/repos/payments/raw/%2e%2e/%2e%2e/admin", "a path trick"},
	} {
		status, body, _, err := do(c.method, base+c.path, scanTok)
		if err != nil {
			return err
		}
		var e struct{ Error, Message string }
		json.Unmarshal([]byte(body), &e)
		show("%s %s → %d %s: %s", c.method, c.why, status, e.Error, e.Message)
		if status < 400 {
			return fmt.Errorf("%s was not refused", c.why)
		}
	}
	status, _, _, err = get(base+"/rest/api/1.0/projects", "fry_wrong-token")
	if err != nil {
		return err
	}
	show("a wrong scanner token → %d", status)
	if n := len(bb.Seen()) - seenBefore; n != 0 {
		return fmt.Errorf("bitbucket received %d of the refused requests", n)
	}
	show("Bitbucket received none of these %d requests", 4)

	step("Bitbucket webhook: a signed push event is spooled by the agent and carried out through the tunnel")
	wstart, err := agent.waitFor("webhook listener started")
	if err != nil {
		return err
	}
	hookURL := "http://" + wstart["listen"].(string) + "/"
	payload := testrig.RefsChangedPayload("PROJ", "payments", 1)
	hc := &http.Client{Timeout: 10 * time.Second}
	defer hc.CloseIdleConnections()
	forged := testrig.WebhookPost(hookURL, "repo:refs_changed", "not-the-secret", payload)
	resp, err := hc.Do(forged)
	if err != nil {
		return err
	}
	resp.Body.Close()
	show("forged X-Hub-Signature → %d (never forwarded)", resp.StatusCode)
	resp, err = hc.Do(testrig.WebhookPost(hookURL, "repo:refs_changed", "demo-webhook-secret", payload))
	if err != nil {
		return err
	}
	resp.Body.Close()
	id := resp.Header.Get("X-Ferry-Delivery-Id")
	show("signed repo:refs_changed → %d, delivery %s fsynced to the spool", resp.StatusCode, id)
	deadline := time.Now().Add(10 * time.Second)
	for len(target.Delivered()) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	got := target.Delivered()
	if len(got) != 1 || got[0].DeliveryID != id || len(target.All()) != 1 {
		return fmt.Errorf("webhook target got %d deliveries, want exactly the signed one (%s)", len(got), id)
	}
	show("cloud target received it: X-Event-Key %s, X-Ferry-Tunnel %s, X-Ferry-Delivery-Id %s",
		got[0].Header.Get("X-Event-Key"), got[0].Header.Get("X-Ferry-Tunnel"), got[0].DeliveryID)

	step("Agent stops (SIGTERM): the relay answers 503 tunnel_offline at once")
	if code := agent.stop(); code != 0 {
		return fmt.Errorf("agent exited %d after SIGTERM", code)
	}
	status, body, _, err = get(base+"/rest/api/1.0/projects", scanTok)
	if err != nil {
		return err
	}
	show("%d %s", status, strings.TrimSpace(body))
	if status != 503 {
		return fmt.Errorf("want 503 with the agent gone, got %d", status)
	}
	if code := relay.stop(); code != 0 {
		return fmt.Errorf("relay exited %d after SIGTERM", code)
	}
	audit, _ := os.ReadFile(filepath.Join(dir, "audit.jsonl"))
	step("Done. The agent's audit log has %d decisions; logs: relay.log, agent.log (run with -keep to look)", strings.Count(string(audit), "\n"))
	return nil
}

func newToken(relayBin string) (tok, hash string, err error) {
	out, err := exec.Command(relayBin, "token").Output()
	if err != nil {
		return "", "", fmt.Errorf("ferry-relay token: %w", err)
	}
	lines := strings.Fields(string(out))
	if len(lines) != 2 {
		return "", "", fmt.Errorf("ferry-relay token printed %q", out)
	}
	return lines[0], lines[1], nil
}

// daemon is a ferry process writing JSON logs to a file.
type daemon struct {
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	code    int
}

func startDaemon(bin, cfg, logPath string) (*daemon, error) {
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, "--config", cfg)
	cmd.Stderr = f
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, err
	}
	d := &daemon{cmd: cmd, logPath: logPath, done: make(chan struct{})}
	go func() {
		err := cmd.Wait()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			d.code = ee.ExitCode()
		}
		f.Close()
		close(d.done)
	}()
	return d, nil
}

// stop sends SIGTERM (once) and returns the exit code.
func (d *daemon) stop() int {
	select {
	case <-d.done:
		return d.code
	default:
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-d.done:
	case <-time.After(40 * time.Second):
		d.cmd.Process.Kill()
		<-d.done
	}
	return d.code
}

// waitFor reads the daemon's log until a line with msg appears.
func (d *daemon) waitFor(msg string) (map[string]any, error) {
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		f, err := os.Open(d.logPath)
		if err == nil {
			sc := bufio.NewScanner(f)
			for sc.Scan() {
				var m map[string]any
				if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == msg {
					f.Close()
					return m, nil
				}
			}
			f.Close()
		}
		select {
		case <-d.done:
			b, _ := os.ReadFile(d.logPath)
			return nil, fmt.Errorf("%s exited early:\n%s", filepath.Base(d.cmd.Path), b)
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil, fmt.Errorf("%s did not log %q", filepath.Base(d.cmd.Path), msg)
}

func waitReady(diag string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for ctx.Err() == nil {
		if resp, err := http.Get("http://" + diag + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("agent did not become ready in 15s (see agent.log)")
}

func get(url, tok string) (int, string, string, error) { return do("GET", url, tok) }

func do(method, url, tok string) (int, string, string, error) {
	req, err := http.NewRequest(method, url, nil)
	if err != nil {
		return 0, "", "", err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(b), resp.Header.Get("X-Ferry-Request-Id"), err
}
