package e2e

import (
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

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

// An egress proxy put in by a reload, and taken out again: the agent's
// connections move (make before break) without a failed request, with
// one connection and with two; settings that cannot connect are refused
// whole and the running connections stay.
func TestReloadMovesRelayConnections(t *testing.T) {
	for _, n := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d connections", n), func(t *testing.T) { testReloadMovesRelayConnections(t, n) })
	}
}

func testReloadMovesRelayConnections(t *testing.T, n int) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	tp, err := testrig.StartTinyproxy(w.dir, testrig.TinyproxyOptions{ConnectPorts: []int{relayPort(t, r.AgentAddr())}})
	if err != nil {
		t.Fatal(err)
	}
	defer tp.Stop()
	conns := fmt.Sprintf("  connections: %d\n", n)
	direct := strings.Replace(w.agentYAML(r.AgentAddr(), ""), "  connections: 2\n", conns, 1)
	withProxy := func(addr string) string {
		return strings.Replace(direct, conns, conns+"  proxy_url: http://"+addr+"\n", 1)
	}
	w.write("agent.yaml", direct)
	a, arun := w.startAgentYAML(direct)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == n })
	// connIDs are the slots' connections, once all are up.
	connIDs := func() []string {
		var ids []string
		for _, c := range a.Status().Connections {
			if c.Connected {
				ids = append(ids, c.ConnectionID)
			}
		}
		return ids
	}
	// movedFrom waits until no slot holds a connection of before.
	movedFrom := func(what string, before []string) []string {
		t.Helper()
		var ids []string
		waitFor(t, what, func() bool {
			ids = connIDs()
			if len(ids) != n {
				return false
			}
			for _, id := range ids {
				if slices.Contains(before, id) {
					return false
				}
			}
			return true
		})
		return ids
	}
	first := connIDs()
	l := startLoad(t, 4, "http://"+r.ScannerAddr()+"/t/"+tunnelID+"/bitbucket/rest/api/1.0/projects/PROJ/repos/app")
	more := func(what string) {
		t.Helper()
		before := l.ok.Load()
		waitFor(t, what, func() bool { return l.ok.Load() > before+100 })
	}
	more("traffic")

	// A proxy that is not there: refused, nothing moves.
	closed, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadAddr := closed.Addr().String()
	closed.Close()
	w.write("agent.yaml", withProxy(deadAddr))
	err = a.Reload()
	if err == nil || !strings.Contains(err.Error(), "the running connections stay") || !strings.Contains(err.Error(), deadAddr) {
		t.Fatalf("reload to a proxy that is not there: %v", err)
	}
	checkReloadMetrics(t, "after the refused reload", a.Metrics().Reloads, 0, 1, 0)
	if c := a.Status().Config; !strings.Contains(c.LastError, "the running connections stay") || c.LastErrorAt.IsZero() {
		t.Errorf("status after the refused reload: %+v", c)
	}
	if page := getPage(t, "http://"+a.DiagAddr()+"/"); !strings.Contains(page, "config reload refused") {
		t.Error("agent status page does not say its last reload was refused")
	}
	if ids := connIDs(); !slices.Equal(ids, first) {
		t.Fatalf("after the refused reload: connections %q, were %q", ids, first)
	}
	more("traffic after the refused reload")

	// Through the proxy, while a download runs on the old connection:
	// it finishes there, whole.
	syn := testrig.Synthetic{Size: 2 << 20, Seed: [32]byte{7}, BytesPerSec: 1 << 20}
	w.bb.AddSynthetic("PROJ", "app", "slow.bin", syn)
	// The download is under way on a connection made before the reload.
	dl := startDownload("http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app/raw/slow.bin")
	w.write("agent.yaml", withProxy(tp.Addr))
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	checkReloadMetrics(t, "after moving through the proxy", a.Metrics().Reloads, 1, 1, 1)
	if c := a.Status().Config; c.LastError != "" {
		t.Errorf("status still shows the earlier refusal after a reload that took: %+v", c)
	}
	viaProxy := movedFrom("connections to move through the proxy", first)
	if log := tp.Log(); !strings.Contains(log, "CONNECT") || !strings.Contains(log, r.AgentAddr()) {
		t.Fatalf("tinyproxy did not carry the new connection:\n%s", log)
	}
	more("traffic through the proxy")
	(<-dl).check(t, "download across the move", syn)

	// And back out: the proxy can then go away without the tunnel noticing.
	w.write("agent.yaml", direct)
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	back := movedFrom("connections to move back", viaProxy)
	tp.Stop()
	more("traffic after the proxy stopped")
	if ids := connIDs(); !slices.Equal(ids, back) {
		t.Errorf("connections %q changed to %q when the proxy stopped: they still went through it", back, ids)
	}
	l.finish()
	if n := l.failed.Load(); n != 0 {
		t.Errorf("%d of %d requests failed while the connection moved:\n%s", n, n+l.ok.Load(), l.why())
	}
}

// TestReloadRelayCARotation: the relay moves to a certificate from a new
// CA. A reload of the agent that would reconnect is refused while its
// relay.ca_file lacks that CA, and the tunnel carries on; the same file
// rewritten with both CAs (same name, new contents) is picked up by the
// next reload, which moves the connections to handshakes with the new
// certificate.
func TestReloadRelayCARotation(t *testing.T) {
	w := newWorld(t)
	w.write("relay.yaml", w.relayYAML("127.0.0.1:0"))
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	oldCA, err := os.ReadFile(w.pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	relayCA := w.write("relay-ca.pem", string(oldCA)) // the agent's relay.ca_file
	agentYAML := func(dialTimeout string) string {
		y := strings.Replace(w.agentYAML(r.AgentAddr(), ""), "  ca_file: "+w.pki.CAFile+"\n  connections", "  ca_file: "+relayCA+"\n  connections", 1)
		return y + "timeouts: {dial: " + dialTimeout + "}\n"
	}
	w.write("agent.yaml", agentYAML("10s"))
	a, arun := w.startAgentYAML(agentYAML("10s"))
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	e := &env{world: w, client: newClient()}
	defer e.client.CloseIdleConnections()
	url := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"

	// The relay's certificate now comes from another CA.
	next, err := testrig.NewPKIFor(t.TempDir(), 20*24*time.Hour) // told apart from the old one by its expiry
	if err != nil {
		t.Fatal(err)
	}
	if err := testrig.ReplaceFile(next.KeyFile, w.pki.KeyFile); err != nil {
		t.Fatal(err)
	}
	if err := testrig.ReplaceFile(next.CertFile, w.pki.CertFile); err != nil {
		t.Fatal(err)
	}
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	// A reload that reconnects is refused: the new connection does not
	// trust the relay; the running ones stay and serve.
	w.write("agent.yaml", agentYAML("9s"))
	err = a.Reload()
	if err == nil || !strings.Contains(err.Error(), "the running connections stay") || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("reload while the relay's CA is unknown: %v", err)
	}
	if s, _, b := e.do("GET", url, scannerToken, nil, nil); s != 200 {
		t.Fatalf("after the refused reload: %d %s", s, b)
	}
	// Both CAs in the same file: the next reload trusts the new one.
	newCA, err := os.ReadFile(next.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	w.write("relay-ca.pem", string(oldCA)+string(newCA))
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "both connections on the new certificate", func() bool {
		n := 0
		for _, c := range a.Status().Connections {
			if c.Connected && c.RelayCertNotAfter.Equal(next.Cert.Leaf.NotAfter) {
				n++
			}
		}
		return n == 2
	})
	if s, _, b := e.do("GET", url, scannerToken, nil, nil); s != 200 {
		t.Fatalf("after the move: %d %s", s, b)
	}
}
