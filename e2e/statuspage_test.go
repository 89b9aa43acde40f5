package e2e

import (
	"io"
	"net/http"
	"strings"
	"testing"
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
