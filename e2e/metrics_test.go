package e2e

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestMetricsAfterRealTraffic(t *testing.T) {
	e := newEnv(t)
	for i := 0; i < 3; i++ {
		if s, _, b := e.do("GET", e.scannerBase+"/rest/api/1.0/projects/PROJ", scannerToken, nil, nil); s != 200 {
			t.Fatalf("%d %s", s, b)
		}
	}
	e.do("POST", e.scannerBase+"/scm/proj/app.git/git-receive-pack", scannerToken, strings.NewReader("0000"), nil)
	e.do("GET", e.scannerBase+"/rest/api/1.0/admin/users", scannerToken, nil, nil)
	e.do("GET", e.scannerBase+"/rest/api/1.0/projects", "fry_wrong", nil, nil)
	e.do("GET", "http://"+e.relay.ScannerAddr()+"/t/no-such-tunnel-"+strings.Repeat("x", 20)+"/bitbucket/", scannerToken, nil, nil)

	rm, am, st := e.relay.Metrics(), e.agent.Metrics(), e.agent.Status().Requests
	// Requests are counted before their answers leave: a scrape right
	// after an answer has it, no waiting.
	checks := []struct {
		name      string
		got, want float64
	}{
		{"relay 200 reads", testutil.ToFloat64(rm.Requests.WithLabelValues(tunnelID, "bitbucket", "read", "200")), 3},
		{"relay 403 write", testutil.ToFloat64(rm.Requests.WithLabelValues(tunnelID, "bitbucket", "write", "403")), 1},
		{"relay unknown tunnel under '-'", testutil.ToFloat64(rm.Requests.WithLabelValues("-", "-", "read", "404")), 1},
		{"relay scanner auth failures", testutil.ToFloat64(rm.AuthFailures.WithLabelValues("scanner")), 1},
		{"relay agent connections", testutil.ToFloat64(rm.AgentConnections.WithLabelValues(tunnelID)), 2},
		{"agent allowed reads", testutil.ToFloat64(am.Requests.WithLabelValues("bitbucket", "read", "200", "allow")), 3},
		// The push and GET admin/users (a read the read profile does not list).
		{"agent default-deny", testutil.ToFloat64(am.PolicyDenials.WithLabelValues("bitbucket", "default-deny")), 2},
		{"agent never:admin", testutil.ToFloat64(am.PolicyDenials.WithLabelValues("bitbucket", "never:admin")), 0},
		{"agent relay connections", testutil.ToFloat64(am.RelayConnections), 2},
		{"agent status page's requests", float64(st.Total), 5},
		{"agent status page's denials", float64(st.Denied), 2},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
	// A stream is done with a moment after its answer has left.
	waitFor(t, "no streams in flight", func() bool {
		return testutil.ToFloat64(rm.StreamsInFlight.WithLabelValues(tunnelID)) == 0 && testutil.ToFloat64(am.StreamsInFlight) == 0
	})
	if n := testutil.ToFloat64(am.Bytes.WithLabelValues("bitbucket", "to_relay")); n <= 0 {
		t.Errorf("agent bytes to_relay = %v", n)
	}
	if n := testutil.CollectAndCount(rm.RequestDuration); n == 0 {
		t.Error("no relay latency observations")
	}
	if problems, err := testutil.GatherAndLint(rm.Registry); err != nil || len(problems) > 0 {
		t.Errorf("relay metrics lint: %v %v", problems, err)
	}
	if problems, err := testutil.GatherAndLint(am.Registry); err != nil || len(problems) > 0 {
		t.Errorf("agent metrics lint: %v %v", problems, err)
	}
	// What Prometheus scrapes from the admin listener.
	resp, err := http.Get("http://" + e.relay.AdminAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{`ferry_relay_requests_total{code="200",method_class="read",tunnel="acme-bbdc",upstream="bitbucket"} 3`, "ferry_relay_build_info{", "go_goroutines", "process_resident_memory_bytes"} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(string(body), "no-such-tunnel") {
		t.Error("a scanner-chosen path segment became a label value")
	}
}

func TestCredentialCheck(t *testing.T) {
	e := newEnv(t)
	waitFor(t, "credential checked", func() bool { return len(e.agent.Status().Credentials) == 1 })
	rep := e.agent.Status().Credentials[0]
	if !rep.Valid || rep.User != "svc-ferry" {
		t.Fatalf("credential report: %+v", rep)
	}
	if d := time.Until(rep.Expiry); d < 59*24*time.Hour || d > 61*24*time.Hour {
		t.Fatalf("expiry %v is not 60 days ahead", rep.Expiry)
	}
	am := e.agent.Metrics()
	if v := testutil.ToFloat64(am.CredentialValid.WithLabelValues("bitbucket")); v != 1 {
		t.Fatalf("credential_valid = %v", v)
	}
	if v := testutil.ToFloat64(am.CredentialExpiry.WithLabelValues("bitbucket")); int64(v) != rep.Expiry.Unix() {
		t.Fatalf("expiry gauge %v, want %d", v, rep.Expiry.Unix())
	}

	// A wrong PAT is reported as such.
	w := newWorld(t)
	w.write("pat", "not-the-pat")
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	a, arun := w.startAgent(r.AgentAddr(), "")
	defer arun.shutdown(t)
	waitFor(t, "credential checked", func() bool { return len(a.Status().Credentials) == 1 })
	if rep := a.Status().Credentials[0]; rep.Valid || !strings.Contains(rep.Problem, "401") {
		t.Fatalf("wrong PAT report: %+v", rep)
	}
	if v := testutil.ToFloat64(a.Metrics().CredentialValid.WithLabelValues("bitbucket")); v != 0 {
		t.Fatalf("credential_valid = %v for a wrong PAT", v)
	}
}

// TestRemovedConfigLeavesNoSeries: what a reload removes leaves no series
// behind. A removed tunnel's ferry_relay_agent_connections would stay at
// 0 and the README's FerryTunnelOffline alert page for good; a removed
// upstream's rejected credential, or a rotated credential's old expiry,
// would keep FerryCredentialExpiringOrRejected firing.
func TestRemovedConfigLeavesNoSeries(t *testing.T) {
	w := newWorld(t)
	relayCfg := w.relayYAML("127.0.0.1:0")
	w.write("relay.yaml", relayCfg)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	w.write("wrong-pat", "not-the-pat")
	mirror := strings.Replace(w.upstreamYAML("mirror", w.bbURL, ""), "/pat}", "/wrong-pat}", 1)
	base := w.agentYAML(r.AgentAddr(), "")
	w.write("agent.yaml", w.agentYAML(r.AgentAddr(), mirror))
	a, arun := w.startAgentYAML(w.agentYAML(r.AgentAddr(), mirror))
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	waitFor(t, "both credentials checked", func() bool { return len(a.Status().Credentials) == 2 })
	am := a.Metrics()
	if v := testutil.ToFloat64(am.CredentialValid.WithLabelValues("mirror")); v != 0 {
		t.Fatalf("mirror's wrong PAT: credential_valid %v", v)
	}
	if n := testutil.CollectAndCount(am.CredentialExpiry); n != 1 {
		t.Fatalf("%d credential expiry series, want bitbucket's", n)
	}

	// The upstream with the rejected credential is removed, and
	// Bitbucket's PAT is rotated to one that does not expire.
	w.bb.TokenExpiryDays.Store(-1)
	w.write("agent.yaml", base)
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the new credential checked", func() bool { return testutil.CollectAndCount(am.CredentialExpiry) == 0 })
	if n := testutil.CollectAndCount(am.CredentialValid); n != 1 || testutil.ToFloat64(am.CredentialValid.WithLabelValues("bitbucket")) != 1 {
		t.Errorf("credential_valid after the reload: %d series, want only bitbucket's, valid", n)
	}
	if cs := a.Status().Credentials; len(cs) != 1 || cs[0].Upstream != "bitbucket" || !cs[0].Expiry.IsZero() {
		t.Errorf("status credentials after the reload: %+v", cs)
	}

	// On the relay: a request counts for the tunnel, then the tunnel with
	// no agent ("other") goes, then the one with this agent.
	e := &env{world: w, relay: r, client: newClient()}
	defer e.client.CloseIdleConnections()
	if s, _, b := e.do("GET", "http://"+r.ScannerAddr()+"/t/"+tunnelID+"/bitbucket/rest/api/1.0/projects/PROJ", scannerToken, nil, nil); s != 200 {
		t.Fatalf("GET: %d %s", s, b)
	}
	cut := func(s, from, to string) string {
		i, j := strings.Index(s, from), strings.Index(s, to)
		if i < 0 || j < i {
			t.Fatalf("%q…%q not in the relay config", from, to)
		}
		return s[:i] + s[j:]
	}
	scrape := func() string {
		resp, err := http.Get("http://" + r.AdminAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if m := scrape(); !strings.Contains(m, `ferry_relay_agent_connections{tunnel="other"} 0`) {
		t.Fatal("no series for the tunnel without an agent to begin with")
	}
	noOther := cut(relayCfg, "  - id: other\n", "scanners:\n")
	noOther = noOther[:strings.Index(noOther, "  - name: elsewhere\n")]
	w.write("relay.yaml", noOther)
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if m := scrape(); strings.Contains(m, `tunnel="other"`) || !strings.Contains(m, `ferry_relay_agent_connections{tunnel="`+tunnelID+`"} 2`) {
		t.Errorf("after removing tunnel other:\n%s", grepLines(m, "tunnel="))
	}
	w.write("relay.yaml", cut(cut(relayCfg, "  - id: "+tunnelID+"\n", "  - id: other\n"), "  - name: appsec\n", "  - name: elsewhere\n"))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the agent cut off", func() bool { return a.Connected() == 0 })
	time.Sleep(300 * time.Millisecond) // the relay's side of the connections ends
	if m := scrape(); strings.Contains(m, `tunnel="`+tunnelID+`"`) || !strings.Contains(m, `ferry_relay_agent_connections{tunnel="other"} 0`) {
		t.Errorf("after removing tunnel %s (with its agent):\n%s", tunnelID, grepLines(m, "tunnel="))
	}
}

// grepLines is the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
