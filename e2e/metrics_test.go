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

	rm, am := e.relay.Metrics(), e.agent.Metrics()
	checks := []struct {
		name      string
		got, want float64
	}{
		{"relay 200 reads", testutil.ToFloat64(rm.Requests.WithLabelValues(tunnelID, "bitbucket", "read", "200")), 3},
		{"relay 403 write", testutil.ToFloat64(rm.Requests.WithLabelValues(tunnelID, "bitbucket", "write", "403")), 1},
		{"relay unknown tunnel under '-'", testutil.ToFloat64(rm.Requests.WithLabelValues("-", "-", "read", "404")), 1},
		{"relay scanner auth failures", testutil.ToFloat64(rm.AuthFailures.WithLabelValues("scanner")), 1},
		{"relay agent connections", testutil.ToFloat64(rm.AgentConnections.WithLabelValues(tunnelID)), 2},
		{"relay streams in flight at rest", testutil.ToFloat64(rm.StreamsInFlight.WithLabelValues(tunnelID)), 0},
		{"agent allowed reads", testutil.ToFloat64(am.Requests.WithLabelValues("bitbucket", "read", "200", "allow")), 3},
		// The push and GET admin/users (a read the read profile does not list).
		{"agent default-deny", testutil.ToFloat64(am.PolicyDenials.WithLabelValues("bitbucket", "default-deny")), 2},
		{"agent never:admin", testutil.ToFloat64(am.PolicyDenials.WithLabelValues("bitbucket", "never:admin")), 0},
		{"agent relay connections", testutil.ToFloat64(am.RelayConnections), 2},
		{"agent streams in flight at rest", testutil.ToFloat64(am.StreamsInFlight), 0},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s = %v, want %v", c.name, c.got, c.want)
		}
	}
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
