package e2e

import (
	"net"
	"strconv"
	"strings"
	"testing"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func relayPort(t *testing.T, addr string) int {
	_, p, _ := net.SplitHostPort(addr)
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestAgentThroughTinyproxyWithBasicAuth(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	tp, err := testrig.StartTinyproxy(w.dir, testrig.TinyproxyOptions{User: "ferry", Password: "s3cret", ConnectPorts: []int{relayPort(t, r.AgentAddr())}})
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Stop()
	cfg := strings.Replace(w.agentYAML(r.AgentAddr(), ""), "  connections: 2\n", "  connections: 2\n  proxy_url: http://ferry:s3cret@"+tp.Addr+"\n", 1)
	a, arun := w.startAgentYAML(cfg)
	defer arun.shutdown(t)
	waitFor(t, "agent connected through the proxy", func() bool { return a.Connected() == 2 })
	e := &env{world: w, client: newClient()}
	defer e.client.CloseIdleConnections()
	if s, _, b := e.do("GET", "http://"+r.ScannerAddr()+"/t/"+tunnelID+"/bitbucket/rest/api/1.0/projects/PROJ", scannerToken, nil, nil); s != 200 {
		t.Fatalf("through the proxy: %d %s", s, b)
	}
	if log := tp.Log(); !strings.Contains(log, "CONNECT") || !strings.Contains(log, r.AgentAddr()) {
		t.Fatalf("tinyproxy did not carry the connection:\n%s", log)
	}
}

func TestAgentExplainsProxyRefusals(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	port := relayPort(t, r.AgentAddr())
	cases := []struct {
		name  string
		opts  testrig.TinyproxyOptions
		creds string
		want  string
	}{
		{"port not allowed", testrig.TinyproxyOptions{User: "ferry", Password: "s3cret", ConnectPorts: []int{port + 1}}, "ferry:s3cret@", "403"},
		{"no credentials", testrig.TinyproxyOptions{User: "ferry", Password: "s3cret", ConnectPorts: []int{port}}, "", "407"},
	}
	for _, c := range cases {
		tp, err := testrig.StartTinyproxy(w.dir, c.opts)
		if err != nil {
			t.Fatal(err)
		}
		cfg := strings.Replace(w.agentYAML(r.AgentAddr(), ""), "  connections: 2\n", "  connections: 1\n  proxy_url: http://"+c.creds+tp.Addr+"\n", 1)
		a, arun := w.startAgentYAML(cfg)
		waitFor(t, "a failed attempt", func() bool { return a.Status().Connections[0].LastError != "" })
		msg := a.Status().Connections[0].LastError
		arun.shutdown(t)
		tp.Stop()
		if !strings.Contains(msg, "proxy") || !strings.Contains(msg, c.want) {
			t.Errorf("%s: last error %q does not explain the proxy's %s", c.name, msg, c.want)
		}
	}
}
