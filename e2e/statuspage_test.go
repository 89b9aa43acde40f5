package e2e

import (
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/relay"
)

func getPage(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("%s: %d %s", url, resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	return string(b)
}

func TestStatusPages(t *testing.T) {
	e := newEnv(t)
	e.do("GET", e.scannerBase+"/rest/api/1.0/projects/PROJ", scannerToken, nil, nil)
	e.do("POST", e.scannerBase+"/scm/proj/app.git/git-receive-pack", scannerToken, strings.NewReader("0000"), nil)
	e.do("GET", "http://"+e.relay.ScannerAddr()+"/t/other/bitbucket/x", otherScanner, nil, nil)

	relay := getPage(t, "http://"+e.relay.AdminAddr()+"/")
	for _, want := range []string{"ferry relay", tunnelID, "online", "test-agent", "offline", "tunnel_offline", "policy_denied", "git-receive-pack",
		"agent TLS certificate valid until", "29 days left"} {
		if !strings.Contains(relay, want) {
			t.Errorf("relay page lacks %q", want)
		}
	}
	agent := getPage(t, "http://"+e.agent.DiagAddr()+"/")
	for _, want := range []string{"ferry agent", "test-agent", "2 of 2 up", "bitbucket", "default-deny", "git-receive-pack"} {
		if !strings.Contains(agent, want) {
			t.Errorf("agent page lacks %q", want)
		}
	}
	for name, page := range map[string]string{"relay": relay, "agent": agent} {
		if strings.Contains(page, "<script") || strings.Contains(page, "<link") || strings.Contains(page, "src=") || strings.Contains(page, "url(") {
			t.Errorf("%s page loads external assets", name)
		}
	}
}

// TestAgentReportsTheRelayCertificate: the agent shows when the
// certificate its relay presents expires, in its status, `ferry-agent
// status` and a metric, since an expired one stops the tunnel on this side.
func TestAgentReportsTheRelayCertificate(t *testing.T) {
	_, agentBin := binaries(t)
	e := newEnv(t)
	want := e.pki.Cert.Leaf.NotAfter
	for _, c := range e.agent.Status().Connections {
		if !c.RelayCertNotAfter.Equal(want) {
			t.Fatalf("connection %d: relay certificate expiry %v, want %v", c.Slot, c.RelayCertNotAfter, want)
		}
	}
	if v := testutil.ToFloat64(e.agent.Metrics().RelayCertExpiry.WithLabelValues()); int64(v) != want.Unix() {
		t.Fatalf("metric %v, want %d", v, want.Unix())
	}
	out, err := exec.Command(agentBin, "status", "--addr", e.agent.DiagAddr()).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "relay certificate valid until "+want.Format(time.DateOnly)) {
		t.Fatalf("ferry-agent status: %v\n%s", err, out)
	}
}

// TestRelayStatusCommand: `ferry-relay status` says what the relay's
// status page says, from the binary alone (a distroless container has no
// curl): tunnels online and not, each agent connection, scanners, the
// certificate and the last errors; --json gives /v1/status as is.
func TestRelayStatusCommand(t *testing.T) {
	relayBin, _ := binaries(t)
	e := newEnv(t)
	e.do("GET", e.scannerBase+"/rest/api/1.0/projects/PROJ", scannerToken, nil, nil)
	e.do("GET", "http://"+e.relay.ScannerAddr()+"/t/other/bitbucket/x", otherScanner, nil, nil)
	out, err := exec.Command(relayBin, "status", "--addr", e.relay.AdminAddr()).CombinedOutput()
	if err != nil {
		t.Fatalf("ferry-relay status: %v\n%s", err, out)
	}
	for _, want := range []string{
		"1 of 2 tunnels online",
		"registry:  memory",
		"certificate (agent listener): valid until " + e.pki.Cert.Leaf.NotAfter.Format(time.DateOnly),
		"requests:  2 (0 refused, 1 failed)",
		"  " + tunnelID + ": online, 2 agent connections",
		"    test-agent (dev) from 127.0.0.1:",
		"  other: OFFLINE, no agent connected",
		"  appsec (tunnels " + tunnelID + "): 0 in flight",
		"503 tunnel_offline tunnel other scanner elsewhere: GET /t/other/bitbucket/x",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("ferry-relay status lacks %q:\n%s", want, out)
		}
	}
	out, err = exec.Command(relayBin, "status", "--json", "--addr", e.relay.AdminAddr()).Output()
	var doc relay.Status
	if err != nil || json.Unmarshal(out, &doc) != nil || doc.RelayID == "" || len(doc.Tunnels) != 2 || len(doc.Scanners) != 2 {
		t.Fatalf("ferry-relay status --json: %v\n%s", err, out)
	}
	// Nothing there: exit 1, saying what to check.
	dead := listenLocal(t)
	addr := dead.Addr().String()
	dead.Close()
	out, err = exec.Command(relayBin, "status", "--addr", addr).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "is ferry-relay running, and is admin_listen "+addr) {
		t.Fatalf("ferry-relay status with no relay: %v\n%s", err, out)
	}
}
