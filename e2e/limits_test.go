package e2e

import (
	"io"
	"net/http"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/internal/token"
)

// TestUpstreamConcurrencyLimit: upstreams[].max_concurrent_requests is
// the broker owner's own bound on what scanners put on Bitbucket,
// whatever the relay allows. Past it requests wait in turn; one that
// waits max_queue_wait gets 503 upstream_busy with Retry-After, and
// Bitbucket never sees it. A reload changes the wait and the limit for
// requests already waiting.
func TestUpstreamConcurrencyLimit(t *testing.T) {
	_, agentBin := binaries(t)
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	limited := func(limit int, wait string) string {
		return strings.Replace(w.agentYAML(r.AgentAddr(), ""), "    response_timeout: 5s\n",
			"    response_timeout: 5s\n    max_concurrent_requests: "+itoa(limit)+"\n    max_queue_wait: "+wait+"\n", 1)
	}
	w.write("agent.yaml", limited(2, "300ms"))
	a, arun := w.startAgentYAML(limited(2, "300ms"))
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	// Each slow download holds a slot for about 4 s.
	w.bb.AddSynthetic("PROJ", "app", "slow.bin", testrig.Synthetic{Size: 800 << 10, BytesPerSec: 200 << 10})
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	get := func(path string) (int, http.Header, string) { return getAs(scannerToken, base+path) }
	slow := func(n int) chan int {
		codes := make(chan int, n)
		for range n {
			go func() {
				code, _, _ := get("/raw/slow.bin")
				codes <- code
			}()
		}
		return codes
	}

	codes := slow(2)
	waitFor(t, "two slow downloads at Bitbucket", func() bool { return w.bb.InFlight() == 2 })
	start := time.Now()
	code, hdr, body := get("")
	if code != http.StatusServiceUnavailable || errorBody(t, body).Error != "upstream_busy" || hdr.Get("Retry-After") != "5" ||
		!strings.Contains(body, "limit of 2 requests at once") {
		t.Fatalf("third request while two hold the slots: %d %v %s", code, hdr, body)
	}
	if waited := time.Since(start); waited < 300*time.Millisecond {
		t.Errorf("refused after %v, before max_queue_wait", waited)
	}
	// seen: whether Bitbucket got the (fast) request for the repository.
	seen := func() bool {
		for _, s := range w.bb.Seen() {
			if s.Path == "/rest/api/1.0/projects/PROJ/repos/app" {
				return true
			}
		}
		return false
	}
	if seen() {
		t.Fatal("Bitbucket saw the refused request")
	}
	if v := testutil.ToFloat64(a.Metrics().UpstreamBusy.WithLabelValues("bitbucket")); v != 1 {
		t.Errorf("upstream_busy counted %v, want 1", v)
	}
	st := a.Status()
	if d := st.Requests.LastDenial; !strings.Contains(d, "max_concurrent_requests") {
		t.Errorf("status last denial %q", d)
	}
	if l := st.Load; len(l) != 1 || l[0].Upstream != "bitbucket" || l[0].InFlight != 2 || l[0].Limit != 2 || l[0].Refused != 1 {
		t.Errorf("status load %+v, want bitbucket 2 of 2 in flight, 1 refused", l)
	}
	if page := getPage(t, "http://"+a.DiagAddr()+"/"); !strings.Contains(page, "2 in flight of 2 at most") || !strings.Contains(page, "1 refused busy since start") {
		t.Errorf("status page does not show the upstream's load")
	}
	out, err := exec.Command(agentBin, "status", "--addr", a.DiagAddr()).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "bitbucket: 2 in flight (max_concurrent_requests 2), 1 refused busy since start") {
		t.Errorf("ferry-agent status: %v\n%s", err, out)
	}

	// A longer wait, by reload: the next request waits its turn and
	// gets in when a download ends.
	w.write("agent.yaml", limited(2, "30s"))
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan int, 1)
	go func() {
		code, _, _ := get("")
		waited <- code
	}()
	waitFor(t, "the request waiting", func() bool {
		return testutil.ToFloat64(a.Metrics().UpstreamWaiting.WithLabelValues("bitbucket")) == 1
	})
	if w.bb.InFlight() != 2 || seen() {
		t.Fatalf("the waiting request reached Bitbucket while both slots were held (%d at Bitbucket)", w.bb.InFlight())
	}
	for range 2 {
		if c := <-codes; c != 200 {
			t.Errorf("slow download: %d", c)
		}
	}
	if c := <-waited; c != 200 || !seen() {
		t.Fatalf("request that waited its turn: %d", c)
	}

	// Requests waiting when a reload raises the limit go in at once.
	codes = slow(4)
	waitFor(t, "two at Bitbucket, two waiting", func() bool {
		return w.bb.InFlight() == 2 && testutil.ToFloat64(a.Metrics().UpstreamWaiting.WithLabelValues("bitbucket")) == 2
	})
	w.write("agent.yaml", limited(4, "30s"))
	if err := a.Reload(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "four at Bitbucket", func() bool { return w.bb.InFlight() == 4 })
	for range 4 {
		if c := <-codes; c != 200 {
			t.Errorf("slow download: %d", c)
		}
	}
}

// TestScannerStreamLimit: scanners[].max_streams keeps one scanner from
// taking every slot of a tunnel it shares with others: past it that
// scanner gets 429 with Retry-After, and the others go on. Requests in
// flight across a relay reload still count; a raised limit applies at
// once.
func TestScannerStreamLimit(t *testing.T) {
	w := newWorld(t)
	const iacToken = "iac-scanner-token"
	withLimit := func(n int) string {
		y := w.relayYAML("127.0.0.1:0")
		y = strings.Replace(y, "    tunnels: ["+tunnelID+"]\n", "    tunnels: ["+tunnelID+"]\n    max_streams: "+itoa(n)+"\n", 1)
		return y + "  - name: iac\n    token: \"" + token.Of(iacToken).String() + "\"\n    tunnels: [" + tunnelID + "]\n"
	}
	w.write("relay.yaml", withLimit(2))
	r, rrun := w.startRelayYAML(withLimit(2))
	defer rrun.shutdown(t)
	a, arun := w.startAgent(r.AgentAddr(), "")
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	w.bb.AddSynthetic("PROJ", "app", "slow.bin", testrig.Synthetic{Size: 800 << 10, BytesPerSec: 200 << 10})
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	get := func(tok, path string) (int, http.Header, string) { return getAs(tok, base+path) }
	codes := make(chan int, 2)
	for range 2 {
		go func() {
			code, _, _ := get(scannerToken, "/raw/slow.bin")
			codes <- code
		}()
	}
	waitFor(t, "two slow downloads at Bitbucket", func() bool { return w.bb.InFlight() == 2 })

	code, hdr, body := get(scannerToken, "")
	if code != http.StatusTooManyRequests || errorBody(t, body).Error != "too_many_requests" || hdr.Get("Retry-After") != "1" ||
		!strings.Contains(body, `scanner \"appsec\" has 2 requests in flight`) {
		t.Fatalf("appsec's third request: %d %v %s", code, hdr, body)
	}
	if code, _, body := get(iacToken, ""); code != 200 {
		t.Fatalf("the other scanner on the same tunnel: %d %s", code, body)
	}
	if v := testutil.ToFloat64(r.Metrics().ScannerOverLimit.WithLabelValues("appsec")); v != 1 {
		t.Errorf("over-limit counted %v, want 1", v)
	}
	want := `<tr><td>appsec</td><td><code>` + tunnelID + `</code> </td><td class="num">2</td><td class="num">2</td><td class="num warn">1</td></tr>`
	if page := getPage(t, "http://"+r.AdminAddr()+"/"); !strings.Contains(page, want) {
		t.Errorf("relay status page lacks the scanner's load %s", want)
	}

	// A reload that leaves the limit: the two in flight still count.
	w.write("relay.yaml", withLimit(2)+"  - name: extra\n    token: \""+token.Of("extra-token").String()+"\"\n    tunnels: ["+tunnelID+"]\n")
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if code, _, _ := get(scannerToken, ""); code != http.StatusTooManyRequests {
		t.Fatalf("after a reload, with two still in flight: %d, want 429", code)
	}
	w.write("relay.yaml", withLimit(3))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if code, _, body := get(scannerToken, ""); code != 200 {
		t.Fatalf("after raising the limit to 3: %d %s", code, body)
	}
	for range 2 {
		if c := <-codes; c != 200 {
			t.Errorf("slow download: %d", c)
		}
	}
}

// getAs GETs url with a scanner token; safe in any goroutine (a failed
// request is status 0 and the error as the body).
func getAs(tok, url string) (int, http.Header, string) {
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, nil, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}
