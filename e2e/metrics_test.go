package e2e

import (
	"io"
	"net/http"
	"strings"
	"testing"

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
