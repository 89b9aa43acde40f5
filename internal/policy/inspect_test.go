package policy

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"strings"
	"testing"
)

const (
	zero = "0000000000000000000000000000000000000000"
	sha1 = "1111111111111111111111111111111111111111"
	sha2 = "2222222222222222222222222222222222222222"
)

func pkt(s string) string { return fmt.Sprintf("%04x%s", len(s)+4, s) }

func pushBody(cmds ...string) string {
	var b strings.Builder
	for i, c := range cmds {
		if i == 0 {
			c += "\x00report-status side-band-64k quiet object-format=sha1 agent=git/2.39.5"
		}
		b.WriteString(pkt(c + "\n"))
	}
	b.WriteString("0000")
	b.WriteString("PACK\x00\x00\x00\x02 pretend pack data")
	return b.String()
}

func appsec(t *testing.T) *Policy {
	t.Helper()
	p, err := New(Options{Profile: "bitbucket-dc-appsec"})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func check(t *testing.T, p *Policy, method, path, query string, hdr http.Header, body string) (string, error) {
	t.Helper()
	d := p.Decide(method, path, query)
	if !d.Allow {
		return "", &Refusal{Status: d.Status, Rule: d.Rule, Reason: d.Reason}
	}
	if hdr == nil {
		hdr = http.Header{}
	}
	out, err := p.CheckBody(d, hdr, strings.NewReader(body))
	if err != nil {
		return "", err
	}
	b, rerr := io.ReadAll(out.R)
	if rerr != nil {
		t.Fatal(rerr)
	}
	return string(b), nil
}

func TestReceivePackPrefix(t *testing.T) {
	p := appsec(t)
	ok := []string{
		pushBody(zero + " " + sha1 + " refs/heads/ferry-fix/cve-2026-1"),
		pushBody(sha1+" "+sha2+" refs/heads/ferry-fix/a", sha1+" "+zero+" refs/heads/ferry-fix/old"),
		pkt("shallow "+sha1+"\n") + pushBody(zero+" "+sha1+" refs/heads/ferry-fix/x"),
	}
	for _, body := range ok {
		got, err := check(t, p, "POST", "/scm/proj/app.git/git-receive-pack", "", nil, body)
		if err != nil {
			t.Errorf("refused %q: %v", body, err)
			continue
		}
		if got != body {
			t.Errorf("forwarded body differs from what was sent:\n%q\n%q", got, body)
		}
	}
	bad := map[string]string{
		"main":             pushBody(sha1 + " " + sha2 + " refs/heads/main"),
		"second ref":       pushBody(zero+" "+sha1+" refs/heads/ferry-fix/ok", sha1+" "+sha2+" refs/heads/main"),
		"delete main":      pushBody(sha1 + " " + zero + " refs/heads/main"),
		"tag":              pushBody(zero + " " + sha1 + " refs/tags/v9"),
		"prefix lookalike": pushBody(zero + " " + sha1 + " refs/heads/ferry-fix"),
		"dotdot":           pushBody(zero + " " + sha1 + " refs/heads/ferry-fix/../main"),
		"no commands":      "0000PACK",
		"bad length":       "zzzz",
		"truncated":        "00ff" + zero,
		"push-cert":        pkt("push-cert\x00report-status\n") + "0000",
		"bad sha":          pushBody("xyz " + sha1 + " refs/heads/ferry-fix/a"),
		"nul later":        pushBody(zero+" "+sha1+" refs/heads/ferry-fix/a", zero+" "+sha1+" refs/heads/main\x00x"),
	}
	for name, body := range bad {
		_, err := check(t, p, "POST", "/scm/proj/app.git/git-receive-pack", "", nil, body)
		var r *Refusal
		if !errors.As(err, &r) {
			t.Errorf("%s: not refused (%v)", name, err)
		}
	}
	// The read profile refuses pushes before looking at the body.
	read, _ := New(Options{Profile: "bitbucket-dc-read"})
	if d := read.Decide("POST", "/scm/proj/app.git/git-receive-pack", ""); d.Allow {
		t.Error("read profile allows receive-pack")
	}
}

func TestReceivePackGzip(t *testing.T) {
	p := appsec(t)
	var z bytes.Buffer
	zw := gzip.NewWriter(&z)
	io.WriteString(zw, pushBody(sha1+" "+sha2+" refs/heads/main"))
	zw.Close()
	hdr := http.Header{"Content-Encoding": {"gzip"}}
	if _, err := check(t, p, "POST", "/scm/p/r.git/git-receive-pack", "", hdr, z.String()); err == nil {
		t.Fatal("a gzipped push to main was not refused")
	}
	if _, err := check(t, p, "POST", "/scm/p/r.git/git-receive-pack", "", http.Header{"Content-Encoding": {"br"}}, "x"); err == nil {
		t.Fatal("an encoding ferry cannot read was not refused")
	}
}

func TestLFSBatch(t *testing.T) {
	p, _ := New(Options{Profile: "bitbucket-dc-read"})
	path := "/scm/proj/app.git/info/lfs/objects/batch"
	if _, err := check(t, p, "POST", path, "", nil, `{"operation":"download","objects":[{"oid":"ab","size":1}]}`); err != nil {
		t.Errorf("download refused: %v", err)
	}
	for _, body := range []string{`{"operation":"upload"}`, `{"operation":"download","operation":"upload"}`, `[]`, `{"operation":"download"} {}`} {
		if _, err := check(t, p, "POST", path, "", nil, body); err == nil {
			t.Errorf("%s allowed", body)
		}
	}
}

func TestBranchCreateAndFileEdit(t *testing.T) {
	p := appsec(t)
	bc := "/rest/branch-utils/1.0/projects/PROJ/repos/app/branches"
	if _, err := check(t, p, "POST", bc, "", nil, `{"name":"ferry-fix/bump-log4j","startPoint":"refs/heads/main"}`); err != nil {
		t.Errorf("branch under prefix refused: %v", err)
	}
	if _, err := check(t, p, "POST", bc, "", nil, `{"name":"refs/heads/ferry-fix/x","startPoint":"main"}`); err != nil {
		t.Errorf("full ref under prefix refused: %v", err)
	}
	for _, body := range []string{`{"name":"main"}`, `{"name":"ferry-fix/../main"}`, `{"name":"ferry-fix/a","name":"main"}`, `{"startPoint":"x"}`} {
		if _, err := check(t, p, "POST", bc, "", nil, body); err == nil {
			t.Errorf("branch create %s allowed", body)
		}
	}
	form := func(fields ...string) (http.Header, string) {
		var b bytes.Buffer
		mw := multipart.NewWriter(&b)
		for i := 0; i+1 < len(fields); i += 2 {
			mw.WriteField(fields[i], fields[i+1])
		}
		mw.Close()
		return http.Header{"Content-Type": {mw.FormDataContentType()}}, b.String()
	}
	edit := "/rest/api/1.0/projects/PROJ/repos/app/browse/pom.xml"
	h, body := form("content", "<xml/>", "message", "bump", "branch", "ferry-fix/bump")
	if got, err := check(t, p, "PUT", edit, "", h, body); err != nil || got != body {
		t.Errorf("file edit on prefix branch: %v", err)
	}
	for _, f := range [][]string{
		{"content", "x", "branch", "main"},
		{"content", "x"},
		{"content", "x", "branch", "ferry-fix/a", "branch", "main"},
	} {
		h, body := form(f...)
		if _, err := check(t, p, "PUT", edit, "", h, body); err == nil {
			t.Errorf("file edit %v allowed", f)
		}
	}
	// The branch is judged as Bitbucket reads it: a quoted-printable
	// part, which Go's multipart reader would decode to ferry-fix/a, would
	// reach Bitbucket as "=66erry-fix/a", a branch outside the prefix.
	// And a field too long to judge whole is refused, not cut.
	part := func(field, cte, value string) string {
		return "--xyz\r\nContent-Disposition: form-data; name=\"" + field + "\"\r\n" + cte + "\r\n" + value + "\r\n"
	}
	raw := func(field, cte, value string) string { return part(field, cte, value) + "--xyz--\r\n" }
	mp := http.Header{"Content-Type": {"multipart/form-data; boundary=xyz"}}
	for name, body := range map[string]string{
		"quoted-printable branch":       raw("branch", "Content-Transfer-Encoding: quoted-printable\r\n", "=66erry-fix/a"),
		"base64 branch":                 raw("branch", "Content-Transfer-Encoding: base64\r\n", "ZmVycnktZml4L2E="),
		"quoted-printable sourceBranch": part("sourceBranch", "Content-Transfer-Encoding: quoted-printable\r\n", "main") + raw("branch", "", "ferry-fix/a"),
		"branch over 1 KiB":             raw("branch", "", "ferry-fix/"+strings.Repeat("a", maxBranchField)),
	} {
		_, err := check(t, p, "PUT", edit, "", mp, body)
		var r *Refusal
		if !errors.As(err, &r) || r.Status != http.StatusBadRequest {
			t.Errorf("%s: got %v, want a 400 refusal", name, err)
		}
	}
	// Go would take the RFC 2231 boundary and see ferry-fix/a; a server
	// that takes only the plain one sees main. Two Content-Types, or two
	// Content-Encodings, leave it to the server which one counts.
	twoForms := strings.ReplaceAll(raw("branch", "", "main"), "xyz", "AAA") + strings.ReplaceAll(raw("branch", "", "ferry-fix/a"), "xyz", "BBB")
	for name, hdr := range map[string]http.Header{
		"RFC 2231 boundary": {"Content-Type": {"multipart/form-data; boundary=AAA; boundary*=utf-8''BBB"}},
		"two Content-Types": {"Content-Type": {"multipart/form-data; boundary=BBB", "multipart/form-data; boundary=AAA"}},
		"two encodings":     {"Content-Type": {"multipart/form-data; boundary=BBB"}, "Content-Encoding": {"identity", "gzip"}},
	} {
		_, err := check(t, p, "PUT", edit, "", hdr, twoForms)
		var r *Refusal
		if !errors.As(err, &r) || r.Status != http.StatusBadRequest {
			t.Errorf("%s: got %v, want a 400 refusal", name, err)
		}
	}
	// Every part's Content-Disposition must read the same to any server:
	// one field, exactly form-data, one plain name.
	withPart := func(hdr string) string {
		return "--xyz\r\n" + hdr + "\r\nmain\r\n" + raw("branch", "", "ferry-fix/a")
	}
	for name, body := range map[string]string{
		"form-data-x":          withPart("Content-Disposition: form-data-x; name=\"branch\"\r\n"),
		"name given twice":     withPart("Content-Disposition: form-data; name=\"branch\"; name=\"x\"\r\n"),
		"two dispositions":     withPart("Content-Disposition: form-data; name=\"branch\"\r\nContent-Disposition: form-data; name=\"x\"\r\n"),
		"no disposition":       withPart("Content-Type: text/plain\r\n"),
		"RFC 2231 name, alone": "--xyz\r\nContent-Disposition: form-data; name*=utf-8''branch\r\n\r\nferry-fix/a\r\n--xyz--\r\n",
	} {
		_, err := check(t, p, "PUT", edit, "", mp, body)
		var r *Refusal
		if !errors.As(err, &r) || r.Status != http.StatusBadRequest {
			t.Errorf("%s: got %v, want a 400 refusal", name, err)
		}
	}
	fileAndBranch := "--xyz\r\nContent-Disposition: form-data; name=\"content\"; filename*=utf-8''p%C3%B6m.xml\r\n\r\n<xml/>\r\n" + raw("branch", "", "ferry-fix/a")
	if _, err := check(t, p, "PUT", edit, "", mp, fileAndBranch); err != nil {
		t.Errorf("a file part with an RFC 2231 filename: %v", err)
	}
	if _, err := check(t, p, "PUT", edit, "", http.Header{"Content-Type": {"multipart/form-data; boundary=BBB"}}, twoForms); err != nil {
		t.Errorf("the form under its one plain boundary: %v", err)
	}
	for _, cte := range []string{"", "Content-Transfer-Encoding: 8bit\r\n", "Content-Transfer-Encoding: BINARY\r\n"} {
		body := raw("branch", cte, "ferry-fix/"+strings.Repeat("a", maxBranchField-len("ferry-fix/")))
		if got, err := check(t, p, "PUT", edit, "", mp, body); err != nil || got != body {
			t.Errorf("file edit with %q and a 1 KiB branch: %v", cte, err)
		}
	}
}

func TestProfilesFamilies(t *testing.T) {
	ar, _ := New(Options{Profile: "bitbucket-dc-access-review"})
	as := appsec(t)
	rd, _ := New(Options{Profile: "bitbucket-dc-read"})
	cases := []struct {
		p            *Policy
		method, path string
		query        string
		allow        bool
	}{
		{ar, "GET", "/rest/api/1.0/admin/users", "", true},
		{ar, "GET", "/rest/api/latest/projects/PROJ/permissions/groups", "", true},
		{ar, "GET", "/rest/api/1.0/projects/PROJ/repos/app/permissions/users", "", true},
		{ar, "PUT", "/rest/api/1.0/projects/PROJ/permissions/users", "name=bob&permission=PROJECT_ADMIN", false},
		{ar, "GET", "/scm/proj/app.git/info/refs", "service=git-upload-pack", false},
		{ar, "GET", "/rest/api/1.0/projects/PROJ/repos/app/raw/secrets.env", "", false},
		{as, "POST", "/rest/api/1.0/projects/PROJ/repos/app/webhooks", "", true},
		{as, "DELETE", "/rest/api/1.0/projects/PROJ/repos/app/webhooks/7", "", true},
		{as, "POST", "/rest/api/1.0/projects/PROJ/repos/app/pull-requests/3/comments", "", true},
		{as, "POST", "/rest/api/1.0/projects/PROJ/repos/app/pull-requests/3/merge", "", false},
		{as, "POST", "/rest/api/1.0/projects/PROJ/repos/app/pull-requests/3/approve", "", false},
		{as, "POST", "/rest/build-status/1.0/commits/" + sha1, "", true},
		{as, "PUT", "/rest/insights/1.0/projects/PROJ/repos/app/commits/" + sha1 + "/reports/ferry-sast", "", true},
		{as, "POST", "/rest/insights/1.0/projects/PROJ/repos/app/commits/" + sha1 + "/reports/ferry-sast/annotations", "", true},
		{as, "GET", "/scm/proj/app.git/info/refs", "service=git-receive-pack", true},
		{as, "PUT", "/rest/api/1.0/projects/PROJ/repos/app/settings/pull-requests", "", false},
		{as, "DELETE", "/rest/api/1.0/projects/PROJ/repos/app", "", false},
		{as, "POST", "/rest/api/1.0/admin/groups/add-user", "", false},
		{rd, "POST", "/rest/api/1.0/projects/PROJ/repos/app/webhooks", "", false},
		{rd, "GET", "/rest/git-lfs/storage/PROJ/app/" + strings.Repeat("a", 64), "", true},
	}
	for _, c := range cases {
		if d := c.p.Decide(c.method, c.path, c.query); d.Allow != c.allow {
			t.Errorf("%s %s %s: allow=%v (%s %s), want %v", c.p.profile, c.method, c.path, d.Allow, d.Rule, d.Reason, c.allow)
		}
	}
}

func TestPushPrefixValidation(t *testing.T) {
	for _, bad := range []string{"refs/heads/", "refs/", "heads/fix/", "refs/heads/fix", "refs/heads/../", "refs/heads/a b/"} {
		if _, err := New(Options{Profile: "bitbucket-dc-appsec", PushRefPrefix: bad}); err == nil {
			t.Errorf("push prefix %q accepted", bad)
		}
	}
	r, _ := CompileRule("rules[0]", RuleSpec{Methods: []string{"POST"}, Path: "/scm/**"})
	if _, err := New(Options{Profile: "bitbucket-dc-read", Rules: []Rule{r}}); err == nil {
		t.Error("a user rule opening git-receive-pack without the ref check was accepted")
	}
}
