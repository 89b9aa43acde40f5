package e2e

import (
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
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
