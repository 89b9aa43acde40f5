package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/audit"
	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func TestCloneAndRESTThroughTunnel(t *testing.T) {
	e := newEnv(t)
	dst := filepath.Join(t.TempDir(), "app")
	gitCmd(t, "", scannerToken, "clone", "-q", e.scannerBase+"/scm/proj/app.git", dst)
	if n := gitCmd(t, dst, scannerToken, "rev-list", "--count", "HEAD"); n != "5" {
		t.Fatalf("clone has %s commits, want 5", n)
	}
	if tags := gitCmd(t, dst, scannerToken, "tag"); tags != "v1" {
		t.Fatalf("tags %q", tags)
	}
	readme, err := os.ReadFile(filepath.Join(dst, "README.md"))
	if err != nil || !strings.Contains(string(readme), "revision 5") {
		t.Fatalf("README: %q %v", readme, err)
	}
	// Fetch after the clone goes through the tunnel too.
	gitCmd(t, dst, scannerToken, "fetch", "-q", "origin")

	status, hdr, body := e.do("GET", e.scannerBase+"/rest/api/1.0/projects/PROJ/repos?limit=10", scannerToken, nil, nil)
	if status != 200 {
		t.Fatalf("REST: %d %s", status, body)
	}
	if !httperr.ValidRequestID(hdr.Get(httperr.RequestIDHeader)) || len(hdr.Values(httperr.RequestIDHeader)) != 1 {
		t.Fatalf("request id header: %q", hdr.Values(httperr.RequestIDHeader))
	}
	var page struct {
		Size       int  `json:"size"`
		IsLastPage bool `json:"isLastPage"`
		Values     []struct {
			Slug  string `json:"slug"`
			Links struct {
				Clone []struct{ Href, Name string } `json:"clone"`
			} `json:"links"`
		} `json:"values"`
	}
	if err := json.Unmarshal([]byte(body), &page); err != nil || page.Size != 1 || page.Values[0].Slug != "app" || !page.IsLastPage {
		t.Fatalf("repos page: %s (%v)", body, err)
	}
	// The request id the scanner saw is the one in the agent's audit log.
	// (The agent records after the response is complete, so wait for it.)
	rid := hdr.Get(httperr.RequestIDHeader)
	waitFor(t, "audit entry for "+rid, func() bool {
		return auditHas(t, e.dir, func(a audit.Entry) bool { return a.RequestID == rid && a.Decision == "allow" && a.Scanner == "appsec" })
	})
}

func auditHas(t *testing.T, dir string, match func(audit.Entry) bool) bool {
	t.Helper()
	return auditFileHas(t, filepath.Join(dir, "audit.jsonl"), match)
}

// auditFileHas reports whether the audit file at path has a line match
// accepts.
func auditFileHas(t *testing.T, path string, match func(audit.Entry) bool) bool {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var a audit.Entry
		if err := json.Unmarshal(sc.Bytes(), &a); err != nil {
			t.Fatalf("audit line %q: %v", sc.Text(), err)
		}
		if match(a) {
			return true
		}
	}
	return false
}

func TestLargeDownloadStreamsWithBoundedMemory(t *testing.T) {
	e := newEnv(t)
	const size = 256 << 20
	syn := testrig.Synthetic{Size: size, Seed: [32]byte{7}}
	e.bb.AddSynthetic("PROJ", "app", "big.bin", syn)
	want := sha256.New()
	io.Copy(want, syn.Reader())

	var peak atomic.Uint64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		var ms runtime.MemStats
		for {
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-time.After(25 * time.Millisecond):
			}
		}
	}()
	req, _ := http.NewRequest("GET", e.scannerBase+"/rest/api/1.0/projects/PROJ/repos/app/raw/big.bin", nil)
	req.Header.Set("Authorization", "Bearer "+scannerToken)
	resp, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	n, err := io.Copy(got, resp.Body)
	resp.Body.Close()
	close(stop)
	wg.Wait()
	if err != nil || n != size {
		t.Fatalf("read %d bytes, err %v", n, err)
	}
	if string(got.Sum(nil)) != string(want.Sum(nil)) {
		t.Fatal("checksum mismatch: the tunnel corrupted the body")
	}
	// Relay, agent, upstream and client all live in this process: the heap
	// must stay far below the payload, i.e. nothing buffered it whole.
	if p := peak.Load(); p > 96<<20 {
		t.Fatalf("heap in use peaked at %d MiB while streaming 256 MiB", p>>20)
	}
	t.Logf("heap peak %d MiB while streaming %d MiB", peak.Load()>>20, size>>20)
}

func TestCredentialsAreSwapped(t *testing.T) {
	e := newEnv(t)
	status, _, body := e.do("GET", e.scannerBase+"/rest/api/1.0/projects", scannerToken, nil, map[string]string{
		"Cookie":              "session=scanner-cookie",
		"X-Forwarded-For":     "203.0.113.9",
		"Forwarded":           "for=203.0.113.9",
		"X-Ferry-Scanner":     "spoofed",
		"Proxy-Authorization": "Basic " + scannerToken,
	})
	if status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	seen := e.bb.Seen()
	if len(seen) == 0 {
		t.Fatal("upstream saw nothing")
	}
	for _, s := range seen {
		if got := s.Header.Get("Authorization"); got != "Bearer "+bitbucketPAT {
			t.Errorf("upstream Authorization = %q, want the PAT", got)
		}
		for k, vs := range s.Header {
			for _, v := range vs {
				if strings.Contains(v, scannerToken) || strings.Contains(v, "203.0.113.9") || strings.Contains(v, "scanner-cookie") || v == "spoofed" {
					t.Errorf("upstream received scanner-side header %s: %s", k, v)
				}
			}
		}
	}
	// The PAT never comes back to the scanner either.
	if strings.Contains(body, bitbucketPAT) {
		t.Fatal("response leaks the PAT")
	}
}

// errorBody decodes a ferry JSON error.
func errorBody(t *testing.T, body string) httperr.Body {
	t.Helper()
	var b httperr.Body
	if err := json.Unmarshal([]byte(body), &b); err != nil {
		t.Fatalf("not a JSON error: %q", body)
	}
	return b
}

func TestScannerErrors(t *testing.T) {
	e := newEnv(t)
	waitCredentialCheck(t, e.agent)
	base := "http://" + e.relay.ScannerAddr()
	before := len(e.bb.Seen())
	cases := []struct {
		name, method, url, tok string
		status                 int
		code                   string
	}{
		{"no token", "GET", e.scannerBase + "/rest/api/1.0/projects", "", 401, httperr.Unauthorized},
		{"wrong token", "GET", e.scannerBase + "/rest/api/1.0/projects", "fry_wrong", 401, httperr.Unauthorized},
		{"agent token as scanner", "GET", e.scannerBase + "/rest/api/1.0/projects", agentToken, 401, httperr.Unauthorized},
		{"other tunnel's scanner", "GET", e.scannerBase + "/rest/api/1.0/projects", otherScanner, 403, httperr.Forbidden},
		{"unknown tunnel", "GET", base + "/t/nope/bitbucket/rest/api/1.0/projects", scannerToken, 404, httperr.UnknownTunnel},
		{"unknown upstream", "GET", base + "/t/" + tunnelID + "/jira/rest/api/2/issue", scannerToken, 404, httperr.UnknownUpstream},
		{"not a tunnel path", "GET", base + "/rest/api/1.0/projects", scannerToken, 404, httperr.NotFound},
		{"offline tunnel", "GET", base + "/t/other/bitbucket/x", otherScanner, 503, httperr.TunnelOffline},
		{"push refused", "POST", e.scannerBase + "/scm/proj/app.git/git-receive-pack", scannerToken, 403, httperr.PolicyDenied},
		{"admin refused", "PUT", e.scannerBase + "/rest/api/1.0/admin/users", scannerToken, 403, httperr.PolicyDenied},
		{"traversal refused", "GET", e.scannerBase + "/rest/api/1.0/projects/PROJ/repos/app/raw/%2e%2e/%2e%2e/admin", scannerToken, 400, httperr.BadRequest},
		{"double slash", "GET", e.scannerBase + "//rest/api/1.0/projects", scannerToken, 400, httperr.BadRequest},
	}
	for _, c := range cases {
		status, hdr, body := e.do(c.method, c.url, c.tok, nil, nil)
		if status != c.status {
			t.Errorf("%s: status %d, want %d (%s)", c.name, status, c.status, body)
			continue
		}
		b := errorBody(t, body)
		if b.Error != c.code || b.Message == "" {
			t.Errorf("%s: body %+v, want code %s", c.name, b, c.code)
		}
		if hdr.Get(httperr.RequestIDHeader) == "" || b.RequestID != hdr.Get(httperr.RequestIDHeader) {
			t.Errorf("%s: request id header %q, body %q", c.name, hdr.Get(httperr.RequestIDHeader), b.RequestID)
		}
	}
	if after := len(e.bb.Seen()); after != before {
		for _, s := range e.bb.Seen()[before:] {
			t.Errorf("upstream saw a refused request: %s %s", s.Method, s.RawPath)
		}
	}
	// A denial names the rule family and reaches the audit log.
	_, _, body := e.do("POST", e.scannerBase+"/scm/proj/app.git/git-receive-pack", scannerToken, strings.NewReader("x"), nil)
	if b := errorBody(t, body); !strings.Contains(b.Message, "bitbucket-dc-read") {
		t.Errorf("denial message does not name the profile: %q", b.Message)
	}
	waitFor(t, "denial in the audit log", func() bool {
		return auditHas(t, e.dir, func(a audit.Entry) bool { return a.Decision == "deny" && a.Status == 403 && a.Rule == "default-deny" })
	})
}

func TestBasicAuthTokenForGit(t *testing.T) {
	e := newEnv(t)
	u := strings.Replace(e.scannerBase, "http://", "http://x-token-auth:"+scannerToken+"@", 1)
	dst := filepath.Join(t.TempDir(), "tools")
	if _, err := testrig.Git("", "clone", "-q", u+"/scm/ops/deploy-tools.git", dst); err != nil {
		t.Fatal(err)
	}
}

func TestAgentGoneAnswers503AtOnce(t *testing.T) {
	e := newEnv(t)
	e.agentRun.shutdown(t)
	e.agentRun = &running{stop: func() {}, done: make(chan error, 1)}
	e.agentRun.done <- nil
	waitFor(t, "relay to notice", func() bool {
		status, _, _ := e.do("GET", e.scannerBase+"/rest/api/1.0/projects", scannerToken, nil, nil)
		return status == 503
	})
	start := time.Now()
	status, _, body := e.do("GET", e.scannerBase+"/rest/api/1.0/projects", scannerToken, nil, nil)
	if status != 503 || errorBody(t, body).Error != httperr.TunnelOffline {
		t.Fatalf("%d %s", status, body)
	}
	t.Logf("503 answered in %v", time.Since(start))
}

func TestUpstreamFailures(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	// An upstream that accepts and never answers, and one that is not there.
	hangURL := w.serveUpstream(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
	dead := listenLocal(t)
	deadURL := "https://" + dead.Addr().String()
	dead.Close()
	extra := w.upstreamYAML("slow", hangURL, "    response_timeout: 500ms\n") +
		"  - name: dead\n    url: " + deadURL + "\n    auth: {type: basic, username: svc, password_file: " + filepath.Join(w.dir, "pat") + "}\n    profile: bitbucket-dc-read\n"
	a, arun := w.startAgent(r.AgentAddr(), extra)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() > 0 })
	e := &env{world: w, relay: r, client: &http.Client{}}
	defer e.client.CloseIdleConnections()
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID
	status, _, body := e.do("GET", base+"/slow/rest/api/1.0/projects", scannerToken, nil, nil)
	if status != 504 || errorBody(t, body).Error != httperr.UpstreamTimeout {
		t.Errorf("slow upstream: %d %s", status, body)
	}
	status, _, body = e.do("GET", base+"/dead/rest/api/1.0/projects", scannerToken, nil, nil)
	b := errorBody(t, body)
	if status != 502 || b.Error != httperr.UpstreamError || strings.Contains(b.Message, "127.0.0.1") {
		t.Errorf("dead upstream: %d %s", status, body)
	}
}

func TestAgentReconnectsAfterRelayRestart(t *testing.T) {
	w := newWorld(t)
	addr := stableAddr(t) // the restarted relay comes back here
	_, rrun := w.startRelay(addr)
	a, arun := w.startAgent(addr, "")
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	rrun.shutdown(t)
	waitFor(t, "agent to notice", func() bool { return a.Connected() == 0 })
	r2, rrun2 := w.startRelay(addr)
	defer rrun2.shutdown(t)
	waitFor(t, "agent reconnected", func() bool { return a.Connected() == 2 })
	e := &env{world: w, client: &http.Client{}}
	defer e.client.CloseIdleConnections()
	status, _, body := e.do("GET", "http://"+r2.ScannerAddr()+"/t/"+tunnelID+"/bitbucket/rest/api/1.0/projects", scannerToken, nil, nil)
	if status != 200 {
		t.Fatalf("after reconnect: %d %s", status, body)
	}
	st := a.Status()
	if st.Connections[0].Reconnects == 0 || st.Connections[0].LastError == "" {
		t.Fatalf("status does not record the reconnect: %+v", st.Connections[0])
	}
}

func TestAgentWithWrongTokenExplains(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	w.write("relay-token", "fry_not-a-valid-token")
	a, arun := w.startAgent(r.AgentAddr(), "")
	defer arun.shutdown(t)
	waitFor(t, "a failed attempt", func() bool { return a.Status().Connections[0].LastError != "" })
	if msg := a.Status().Connections[0].LastError; !strings.Contains(msg, "401") || !strings.Contains(msg, "token") {
		t.Fatalf("last error does not explain the refusal: %q", msg)
	}
	if a.Connected() != 0 {
		t.Fatal("connected with a wrong token")
	}
}

func TestLargeUploadStreams(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	a, arun := w.startAgent(r.AgentAddr(), "    rules: [{methods: [POST], path: \""+testrig.SinkPath+"\"}]\n")
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() > 0 })
	client := &http.Client{}
	defer client.CloseIdleConnections()

	const size = 64 << 20
	syn := testrig.Synthetic{Size: size, Seed: [32]byte{9}}
	want := sha256.New()
	io.Copy(want, syn.Reader())
	// Chunked (unknown length) and with Expect: 100-continue, as git sends
	// large pushes.
	req, _ := http.NewRequest("POST", "http://"+r.ScannerAddr()+"/t/"+tunnelID+"/bitbucket"+testrig.SinkPath, io.NopCloser(syn.Reader()))
	req.Header.Set("Authorization", "Bearer "+scannerToken)
	req.Header.Set("Expect", "100-continue")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var got struct {
		Bytes  int64  `json:"bytes"`
		SHA256 string `json:"sha256"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&got); err != nil || resp.StatusCode != 200 {
		t.Fatalf("%d %v", resp.StatusCode, err)
	}
	if got.Bytes != size || got.SHA256 != hex.EncodeToString(want.Sum(nil)) {
		t.Fatalf("upstream received %d bytes with sha256 %s", got.Bytes, got.SHA256)
	}
}

func TestFailedAuthIsRateLimited(t *testing.T) {
	e := newEnv(t)
	var statuses []int
	for i := 0; i < 25; i++ {
		s, _, _ := e.do("GET", e.scannerBase+"/rest/api/1.0/projects", "fry_guess", nil, nil)
		statuses = append(statuses, s)
	}
	if statuses[0] != 401 || statuses[len(statuses)-1] != 429 {
		t.Fatalf("statuses for 25 wrong tokens: %v", statuses)
	}
	status, hdr, body := e.do("GET", e.scannerBase+"/rest/api/1.0/projects/PROJ", scannerToken, nil, nil)
	if status != 429 || hdr.Get("Retry-After") == "" || errorBody(t, body).Error != "too_many_requests" {
		t.Fatalf("a limited source: %d %v %s", status, hdr, body)
	}
}

// A push the policy refuses, sent with "Expect: 100-continue" as git sends
// large pushes, is answered at once and its body never leaves the scanner.
func TestRefusedUploadIsNeverSent(t *testing.T) {
	e := newEnv(t)
	body := &testrig.ReadCounter{R: strings.NewReader(strings.Repeat("p", 4<<20))}
	req, _ := http.NewRequest("POST", e.scannerBase+"/scm/proj/app.git/git-receive-pack", body)
	req.Header.Set("Authorization", "Bearer "+scannerToken)
	req.Header.Set("Content-Type", "application/x-git-receive-pack-request")
	req.Header.Set("Expect", "100-continue")
	// A client that waits long for the 100, so that a relay or agent that
	// never answers would be seen sending the body.
	client := &http.Client{Transport: &http.Transport{ExpectContinueTimeout: time.Minute}}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 403 || errorBody(t, string(b)).Error != httperr.PolicyDenied {
		t.Fatalf("refused push: %d %s", resp.StatusCode, b)
	}
	if n := body.Reads(); n != 0 {
		t.Fatalf("the scanner's client was asked for the refused body (%d reads)", n)
	}
}

// Requests that follow one another on the agent's kept streams are each
// judged and recorded as themselves: allowed and refused ones interleaved,
// every audit entry under the request id its scanner saw.
func TestRequestsOnKeptStreamsAreJudgedOneByOne(t *testing.T) {
	e := newEnv(t)
	waitCredentialCheck(t, e.agent)
	want := map[string]int{} // request id: status
	for i := range 12 {
		path, status := "/rest/api/1.0/projects/PROJ/repos?limit=10", 200
		if i%3 == 2 {
			path, status = "/plugins/servlet/upm", 403
		}
		got, hdr, body := e.do("GET", e.scannerBase+path, scannerToken, nil, nil)
		if got != status {
			t.Fatalf("request %d (%s): %d %s, want %d", i, path, got, body, status)
		}
		want[hdr.Get(httperr.RequestIDHeader)] = status
	}
	if len(want) != 12 {
		t.Fatalf("12 requests carried %d request ids", len(want))
	}
	for rid, status := range want {
		waitFor(t, "audit entry for "+rid, func() bool {
			return auditHas(t, e.dir, func(a audit.Entry) bool {
				return a.RequestID == rid && a.Status == status && a.Scanner == "appsec" && a.Upstream == "bitbucket" &&
					(a.Decision == "allow") == (status == 200)
			})
		})
	}
}

// TestOverIPv6 runs the whole path on ::1: the relay's listeners, the
// agent's relay URL and its upstream, a clone and a REST call.
func TestOverIPv6(t *testing.T) {
	w := newWorld(t)
	ln, err := net.Listen("tcp", "[::1]:0")
	if err != nil {
		t.Skipf("no IPv6 loopback here: %v", err)
	}
	srv := &http.Server{Handler: w.bb, TLSConfig: w.pki.ServerTLS(), ReadHeaderTimeout: 10 * time.Second}
	go srv.ServeTLS(ln, "", "")
	defer srv.Close()
	y := w.relayYAMLWith("[::1]:0", "[::1]:0", "")
	w.write("relay.yaml", y)
	r, rrun := w.startRelayYAML(y)
	defer rrun.shutdown(t)
	if !strings.HasPrefix(r.AgentAddr(), "[::1]:") || !strings.HasPrefix(r.ScannerAddr(), "[::1]:") {
		t.Fatalf("relay listens on %s and %s", r.AgentAddr(), r.ScannerAddr())
	}
	a, arun := w.startAgentYAML(strings.Replace(w.agentYAML(r.AgentAddr(), ""), w.bbURL, "https://"+ln.Addr().String(), 1))
	defer arun.shutdown(t)
	waitFor(t, "agent connected over IPv6", func() bool { return a.Connected() == 2 })
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket"
	e := &env{world: w, relay: r, agent: a, client: newClient(), scannerBase: base}
	defer e.client.CloseIdleConnections()
	if status, _, body := e.do("GET", base+"/rest/api/1.0/projects", scannerToken, nil, nil); status != 200 || !strings.Contains(body, `"PROJ"`) {
		t.Fatalf("REST over IPv6: %d %s", status, body)
	}
	dst := filepath.Join(t.TempDir(), "app")
	gitCmd(t, "", scannerToken, "clone", "-q", base+"/scm/proj/app.git", dst)
	if n := gitCmd(t, dst, scannerToken, "rev-list", "--count", "HEAD"); n != "5" {
		t.Fatalf("clone over IPv6 has %s commits, want 5", n)
	}
}
