package e2e

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// rawRequest sends exactly this request line and these headers, so no
// client library re-encodes the hostile target.
func rawRequest(t *testing.T, addr, method, target string, hdr map[string]string, body string) (int, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\nContent-Length: %d\r\n", method, target, len(body))
	if _, ok := hdr["Authorization"]; !ok {
		fmt.Fprintf(&b, "Authorization: Bearer %s\r\n", scannerToken)
	}
	for k, v := range hdr {
		fmt.Fprintf(&b, "%s: %s\r\n", k, v)
	}
	b.WriteString("\r\n")
	b.WriteString(body)
	if _, err := io.WriteString(conn, b.String()); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("%s %s: %v", method, target, err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(rb)
}

const (
	z40 = "0000000000000000000000000000000000000000"
	a40 = "1111111111111111111111111111111111111111"
	b40 = "2222222222222222222222222222222222222222"
)

func pushCmds(cmds ...string) string {
	var b strings.Builder
	for i, c := range cmds {
		if i == 0 {
			c += "\x00report-status side-band-64k agent=git/2.39.5"
		}
		c += "\n"
		fmt.Fprintf(&b, "%04x%s", len(c)+4, c)
	}
	return b.String() + "0000PACK\x00\x00\x00\x02"
}

func gzipped(s string) string {
	var b bytes.Buffer
	zw := gzip.NewWriter(&b)
	io.WriteString(zw, s)
	zw.Close()
	return b.String()
}

func formBody(fields ...string) (string, string) {
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	for i := 0; i+1 < len(fields); i += 2 {
		mw.WriteField(fields[i], fields[i+1])
	}
	mw.Close()
	return mw.FormDataContentType(), b.String()
}

func TestHostileRequestsNeverReachBitbucket(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	cfg := strings.Replace(w.agentYAML(r.AgentAddr(), "    repositories: [\"PROJ/*\"]\n"), "profile: bitbucket-dc-read", "profile: bitbucket-dc-appsec", 1)
	a, arun := w.startAgentYAML(cfg)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() > 0 })
	waitCredentialCheck(t, a)

	const (
		p    = "/t/" + tunnelID + "/bitbucket"
		repo = p + "/rest/api/1.0/projects/PROJ/repos/app"
		raw  = repo + "/raw"
	)
	formCT, formMain := formBody("content", "x", "message", "m", "branch", "main")
	_, formTwice := formBody("content", "x", "branch", "ferry-fix/a", "branch", "main")
	manyHeaders := map[string]string{}
	for i := 0; i < 70; i++ {
		manyHeaders[fmt.Sprintf("X-Pad-%d", i)] = "x"
	}
	json := map[string]string{"Content-Type": "application/json"}
	cases := []struct {
		name, method, target string
		hdr                  map[string]string
		body                 string
		status               int
	}{
		// Traversal and encoding tricks: refused before any rule is consulted.
		{"dotdot", "GET", raw + "/../../../../admin", nil, "", 400},
		{"encoded dotdot", "GET", raw + "/%2e%2e/%2e%2e/x", nil, "", 400},
		{"upper encoded dotdot", "GET", raw + "/%2E%2E/x", nil, "", 400},
		{"mixed dotdot 1", "GET", raw + "/.%2e/x", nil, "", 400},
		{"mixed dotdot 2", "GET", raw + "/%2e./x", nil, "", 400},
		{"dot", "GET", raw + "/./x", nil, "", 400},
		{"encoded dot", "GET", raw + "/%2e/x", nil, "", 400},
		{"encoded slash traversal", "GET", raw + "/a%2f..%2f..%2fadmin", nil, "", 400},
		{"upper encoded slash", "GET", raw + "/a%2F..%2Fb", nil, "", 400},
		{"encoded backslash", "GET", raw + "/a%5c..%5cb", nil, "", 400},
		{"raw backslash", "GET", raw + "/a\\..\\b", nil, "", 400},
		{"double encoding", "GET", raw + "/%252e%252e/x", nil, "", 400},
		{"triple encoding", "GET", raw + "/%25252e%25252e/x", nil, "", 400},
		{"path parameter on repo", "GET", repo + ";x=1/raw/a", nil, "", 400},
		{"jsessionid", "GET", raw + "/a;jsessionid=abc", nil, "", 400},
		{"encoded semicolon", "GET", raw + "/a%3bx", nil, "", 400},
		{"empty segment", "GET", p + "/rest/api/1.0//projects/PROJ/repos/app", nil, "", 400},
		{"leading double slash", "GET", p + "//rest/api/1.0/projects", nil, "", 400},
		{"NUL", "GET", raw + "/a%00.txt", nil, "", 400},
		{"CRLF injection", "GET", raw + "/a%0d%0aX-Injected:%201", nil, "", 400},
		{"DEL", "GET", raw + "/a%7f", nil, "", 400},
		{"dot-only segment", "GET", raw + "/...", nil, "", 400},
		{"overlong UTF-8 dots", "GET", raw + "/%c0%ae%c0%ae/x", nil, "", 400},
		{"IIS unicode escape", "GET", raw + "/%u002e%u002e/x", nil, "", 400},
		{"bad escape", "GET", raw + "/a%zz", nil, "", 400},
		{"truncated escape", "GET", raw + "/a%2", nil, "", 400},
		{"bad query escape", "GET", p + "/rest/api/1.0/projects/PROJ/repos?x=%zz", nil, "", 400},
		{"semicolon query", "GET", p + "/rest/api/1.0/projects/PROJ/repos?a=1;b=2", nil, "", 400},
		{"_method query", "GET", repo + "?_method=DELETE", nil, "", 400},
		// Never allowed, whatever the profile says.
		{"admin user write", "PUT", p + "/rest/api/1.0/admin/users?name=x", nil, "", 403},
		{"admin add to group", "POST", p + "/rest/api/1.0/admin/groups/add-user", json, "{}", 403},
		{"admin delete user", "DELETE", p + "/rest/api/1.0/admin/users?name=bob", nil, "", 403},
		{"admin ui", "GET", p + "/admin/users", nil, "", 403},
		{"plugin servlet", "GET", p + "/plugins/servlet/upm", nil, "", 403},
		{"plugin servlet post", "POST", p + "/plugins/servlet/upm", nil, "x", 403},
		{"plugin servlet case", "GET", p + "/PLUGINS/SERVLET/upm", nil, "", 403},
		{"plugin install", "POST", p + "/rest/plugins/1.0/", nil, "x", 403},
		{"project permission grant", "PUT", p + "/rest/api/1.0/projects/PROJ/permissions/users?name=x&permission=PROJECT_ADMIN", nil, "", 403},
		{"repo permission grant", "PUT", repo + "/permissions/users?name=x&permission=REPO_ADMIN", nil, "", 403},
		{"repo delete", "DELETE", repo, nil, "", 403},
		{"project delete", "DELETE", p + "/rest/api/latest/projects/PROJ", nil, "", 403},
		{"repo settings", "PUT", repo + "/settings/pull-requests", json, "{}", 403},
		{"user write", "PUT", p + "/rest/api/1.0/users/credentials", json, "{}", 403},
		// Outside the repositories scope.
		{"other repo", "GET", p + "/rest/api/1.0/projects/SECRET/repos/vault", nil, "", 403},
		{"other repo case", "GET", p + "/rest/api/1.0/projects/secret/repos/VAULT/raw/x", nil, "", 403},
		{"other repo git refs", "GET", p + "/scm/secret/vault.git/info/refs?service=git-upload-pack", nil, "", 403},
		{"other repo git fetch", "POST", p + "/scm/secret/vault.git/git-upload-pack", nil, "0000", 403},
		{"all projects", "GET", p + "/rest/api/1.0/projects", nil, "", 403},
		{"all repos", "GET", p + "/rest/api/1.0/repos", nil, "", 403},
		{"other project's repos", "GET", p + "/rest/api/1.0/projects/SECRET/repos", nil, "", 403},
		{"webhook on other repo", "POST", p + "/rest/api/1.0/projects/SECRET/repos/vault/webhooks", json, "{}", 403},
		// Writes outside the push prefix.
		{"push to main", "POST", p + "/scm/proj/app.git/git-receive-pack", nil, pushCmds(a40 + " " + b40 + " refs/heads/main"), 403},
		{"delete main", "POST", p + "/scm/proj/app.git/git-receive-pack", nil, pushCmds(a40 + " " + z40 + " refs/heads/main"), 403},
		{"push tag", "POST", p + "/scm/proj/app.git/git-receive-pack", nil, pushCmds(z40 + " " + a40 + " refs/tags/v1"), 403},
		{"push one ref outside", "POST", p + "/scm/proj/app.git/git-receive-pack", nil, pushCmds(z40+" "+a40+" refs/heads/ferry-fix/ok", a40+" "+b40+" refs/heads/main"), 403},
		{"push prefix without slash", "POST", p + "/scm/proj/app.git/git-receive-pack", nil, pushCmds(z40 + " " + a40 + " refs/heads/ferry-fix"), 403},
		{"push ref traversal", "POST", p + "/scm/proj/app.git/git-receive-pack", nil, pushCmds(z40 + " " + a40 + " refs/heads/ferry-fix/../main"), 400},
		{"gzipped push to main", "POST", p + "/scm/proj/app.git/git-receive-pack", map[string]string{"Content-Encoding": "gzip"}, gzipped(pushCmds(a40 + " " + b40 + " refs/heads/main")), 403},
		{"push in opaque encoding", "POST", p + "/scm/proj/app.git/git-receive-pack", map[string]string{"Content-Encoding": "br"}, "x", 400},
		{"garbage push", "POST", p + "/scm/proj/app.git/git-receive-pack", nil, "GET /admin HTTP/1.1\r\n\r\n", 400},
		{"duplicate service", "GET", p + "/scm/proj/app.git/info/refs?service=git-receive-pack&service=git-upload-pack", nil, "", 403},
		{"branch create main", "POST", p + "/rest/branch-utils/1.0/projects/PROJ/repos/app/branches", json, `{"name":"main","startPoint":"refs/heads/main"}`, 403},
		{"branch create duplicate key", "POST", p + "/rest/branch-utils/1.0/projects/PROJ/repos/app/branches", json, `{"name":"ferry-fix/a","name":"main"}`, 400},
		{"file edit on main", "PUT", raw[:len(raw)-4] + "/browse/pom.xml", map[string]string{"Content-Type": formCT}, formMain, 403},
		{"file edit two branches", "PUT", raw[:len(raw)-4] + "/browse/pom.xml", map[string]string{"Content-Type": formCT}, formTwice, 400},
		{"LFS upload", "POST", p + "/scm/proj/app.git/info/lfs/objects/batch", json, `{"operation":"upload","objects":[]}`, 403},
		{"PR merge", "POST", repo + "/pull-requests/1/merge", json, "{}", 403},
		{"PR approve", "POST", repo + "/pull-requests/1/approve", json, "{}", 403},
		// Method tricks.
		{"method override header", "GET", repo, map[string]string{"X-HTTP-Method-Override": "DELETE"}, "", 400},
		{"X-HTTP-Method", "POST", repo + "/webhooks", map[string]string{"X-HTTP-Method": "PUT"}, "{}", 400},
		{"X-Method-Override", "GET", repo, map[string]string{"X-Method-Override": "DELETE"}, "", 400},
		{"TRACE", "TRACE", p + "/rest/api/1.0/projects/PROJ", nil, "", 403},
		{"lower-case method", "get", p + "/rest/api/1.0/projects/PROJ", nil, "", 403},
		{"OPTIONS", "OPTIONS", p + "/rest/api/1.0/projects/PROJ", nil, "", 403},
		{"PATCH", "PATCH", repo, json, "{}", 403},
		{"PROPFIND", "PROPFIND", repo, nil, "", 403},
		// Protocol-level tricks at the relay.
		{"upgrade", "GET", repo, map[string]string{"Connection": "Upgrade", "Upgrade": "websocket"}, "", 400},
		{"absolute-form target", "GET", "http://bitbucket.internal" + p + "/rest/api/1.0/projects/PROJ", nil, "", 404},
		{"too many headers", "GET", p + "/rest/api/1.0/projects/PROJ", manyHeaders, "", 431},
		{"huge URI", "GET", p + "/rest/api/1.0/projects/PROJ?x=" + strings.Repeat("a", 9000), nil, "", 414},
	}
	if len(cases) < 60 {
		t.Fatalf("only %d hostile requests", len(cases))
	}
	before := len(w.bb.Seen())
	for _, c := range cases {
		status, body := rawRequest(t, r.ScannerAddr(), c.method, c.target, c.hdr, c.body)
		if status != c.status {
			t.Errorf("%s: %s %s → %d, want %d (%s)", c.name, c.method, c.target, status, c.status, strings.TrimSpace(body))
		}
		if seen := w.bb.Seen(); len(seen) != before {
			t.Errorf("%s: Bitbucket received %s %s", c.name, seen[len(seen)-1].Method, seen[len(seen)-1].RawPath)
			before = len(seen)
		}
	}

	// The same tunnel still serves what is allowed.
	status, body := rawRequest(t, r.ScannerAddr(), "GET", repo+"/branches", nil, "")
	if status != 200 || !strings.Contains(body, `"displayId":"main"`) {
		t.Fatalf("allowed request after the hostile ones: %d %s", status, body)
	}
}
