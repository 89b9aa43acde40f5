package policy

import (
	"errors"
	"net/http"
	"strings"
	"testing"
)

func TestNormalizePath(t *testing.T) {
	ok := map[string]string{
		"/rest/api/1.0/projects":            "/rest/api/1.0/projects",
		"/scm/proj/repo.git/info/refs":      "/scm/proj/repo.git/info/refs",
		"/rest/api/1.0/projects/P/repos/r/": "/rest/api/1.0/projects/P/repos/r/",
		"/browse/a%20b/c%C3%A9.txt":         "/browse/a b/cé.txt",
		"/x/%7Euser/file.v1.2":              "/x/~user/file.v1.2",
		"/":                                 "/",
	}
	for in, want := range ok {
		got, err := NormalizePath(in)
		if err != nil || got != want {
			t.Errorf("NormalizePath(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	bad := []string{
		"", "rest/api", "/a/../b", "/a/./b", "/a/%2e%2e/b", "/a/%2E/b", "/a/.%2e/b", "/a//b", "//a",
		"/a%2fb", "/a%2Fb", "/a%5cb", "/a\\b", "/a%252e%252e/b", "/a;jsessionid=1/b", "/a%3bx",
		"/a%00b", "/a%0d%0aX: y", "/a b", "/a%zz", "/a%2", "/a/...", "/a/%c3%28", "/\x7f",
		"/" + strings.Repeat("a", 5000),
	}
	for _, in := range bad {
		if got, err := NormalizePath(in); !errors.Is(err, ErrAmbiguous) {
			t.Errorf("NormalizePath(%q) = %q, %v; want refusal", in, got, err)
		}
	}
}

func TestGlob(t *testing.T) {
	cases := []struct {
		pat, path string
		want      bool
	}{
		{"/rest/api/{1.0,latest}/projects", "/rest/api/latest/projects", true},
		{"/rest/api/{1.0,latest}/projects", "/rest/api/2.0/projects", false},
		{"/rest/api/*/projects/*", "/REST/API/1.0/PROJECTS/ABC", true},
		{"/rest/api/*/projects/*", "/rest/api/1.0/projects/a/repos", false},
		{"/a/**", "/a", true},
		{"/a/**", "/a/b/c/d", true},
		{"/a/**/z", "/a/z", true},
		{"/a/**/z", "/a/b/c/z", true},
		{"/a/**/z", "/a/b/c/y", false},
		{"/scm/*/*.git/info/refs", "/scm/p/r.git/info/refs", true},
		{"/scm/*/*.git/info/refs", "/scm/p/r/info/refs", false},
		{"/a/b", "/a/b/", true},
	}
	for _, c := range cases {
		p, err := compilePattern(c.pat)
		if err != nil {
			t.Fatalf("%s: %v", c.pat, err)
		}
		if got := p.match(c.path); got != c.want {
			t.Errorf("%s ~ %s = %v, want %v", c.pat, c.path, got, c.want)
		}
	}
	for _, bad := range []string{"a", "/a//b", "/a**", "/{a,}", "/[a"} {
		if _, err := compilePattern(bad); err == nil {
			t.Errorf("compilePattern(%q) accepted", bad)
		}
	}
}

func mustPolicy(t *testing.T, profile string, rules []RuleSpec, repos []string) *Policy {
	t.Helper()
	var compiled []Rule
	for i, s := range rules {
		r, err := CompileRule("rules["+string(rune('0'+i))+"]", s)
		if err != nil {
			t.Fatal(err)
		}
		compiled = append(compiled, r)
	}
	p, err := New(Options{Profile: profile, Rules: compiled, Repositories: repos})
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestReadProfile(t *testing.T) {
	p := mustPolicy(t, "bitbucket-dc-read", nil, nil)
	cases := []struct {
		method, path, query string
		allow               bool
		status              int
	}{
		{"GET", "/rest/api/1.0/projects", "", true, 0},
		{"GET", "/rest/api/latest/projects/PROJ/repos/app/branches", "limit=100", true, 0},
		{"GET", "/rest/api/1.0/projects/PROJ/repos/app/raw/src/main.go", "at=refs/heads/main", true, 0},
		{"GET", "/scm/proj/app.git/info/refs", "service=git-upload-pack", true, 0},
		{"POST", "/scm/proj/app.git/git-upload-pack", "", true, 0},
		{"GET", "/scm/proj/app.git/info/refs", "service=git-receive-pack", false, 403},
		{"GET", "/scm/proj/app.git/info/refs", "service=git-upload-pack&service=git-receive-pack", false, 403},
		{"POST", "/scm/proj/app.git/git-receive-pack", "", false, 403},
		{"POST", "/rest/api/1.0/projects", "", false, 403},
		{"DELETE", "/rest/api/1.0/projects/PROJ/repos/app", "", false, 403},
		{"GET", "/rest/api/1.0/admin/users", "", false, 403},
		{"GET", "/plugins/servlet/upm", "", false, 403},
		{"GET", "/rest/api/1.0/projects/PROJ/repos/app/../../../admin", "", false, 400},
		{"GET", "/rest/api/1.0/projects/PROJ/repos/app/raw/a%2f..%2fb", "", false, 400},
		{"GET", "/rest/api/1.0/projects", "a=%zz", false, 400},
	}
	for _, c := range cases {
		d := p.Decide(c.method, c.path, c.query)
		if d.Allow != c.allow || (!c.allow && d.Status != c.status) {
			t.Errorf("%s %s?%s: allow=%v status=%d rule=%s (%s); want allow=%v status=%d",
				c.method, c.path, c.query, d.Allow, d.Status, d.Rule, d.Reason, c.allow, c.status)
		}
	}
}

func TestUserRulesAndNeverAllowed(t *testing.T) {
	p := mustPolicy(t, "bitbucket-dc-read", []RuleSpec{
		{Methods: []string{"get"}, Path: "/rest/api/*/projects/SECRET/**", Action: "deny"},
		{Methods: []string{"GET"}, Path: "/rest/foo/**"},
		{Methods: []string{"DELETE"}, Path: "/rest/api/*/projects/*/repos/*"},
		{Methods: []string{"POST"}, Path: "/plugins/servlet/**"},
	}, nil)
	if d := p.Decide("GET", "/rest/foo/bar", ""); !d.Allow || d.Rule != "rules[1]" {
		t.Errorf("user allow rule: %+v", d)
	}
	if d := p.Decide("GET", "/rest/api/1.0/projects/secret/repos", ""); d.Allow || d.Rule != "rules[0]" {
		t.Errorf("user deny rule must win over the profile: %+v", d)
	}
	if d := p.Decide("DELETE", "/rest/api/1.0/projects/P/repos/r", ""); d.Allow || !strings.HasPrefix(d.Rule, "never:") {
		t.Errorf("a user rule must not open repo delete: %+v", d)
	}
	if d := p.Decide("POST", "/PLUGINS/servlet/x", ""); d.Allow {
		t.Errorf("a user rule must not open plugin servlets: %+v", d)
	}
	if _, err := CompileRule("r", RuleSpec{Methods: []string{"BREW"}, Path: "/x"}); err == nil {
		t.Error("unknown method accepted")
	}
	if _, err := CompileRule("r", RuleSpec{Methods: []string{"GET"}, Path: "/x", Action: "maybe"}); err == nil {
		t.Error("unknown action accepted")
	}
	if _, err := New(Options{Profile: "bitbucket-dc-everything"}); err == nil {
		t.Error("unknown profile accepted")
	}
}

func TestRepositoryScope(t *testing.T) {
	p := mustPolicy(t, "bitbucket-dc-read", nil, []string{"PROJ/*", "OPS/deploy-tools"})
	cases := []struct {
		path, query string
		allow       bool
	}{
		{"/rest/api/1.0/projects/proj/repos/anything/commits", "", true},
		{"/rest/api/1.0/projects/OPS/repos/Deploy-Tools", "", true},
		{"/rest/api/1.0/projects/OPS/repos/other", "", false},
		{"/rest/api/1.0/projects/OPS/repos", "", false},
		{"/rest/api/1.0/projects/PROJ/repos", "", true},
		{"/rest/api/1.0/projects", "", false},
		{"/rest/api/1.0/repos", "", false},
		{"/rest/api/1.0/application-properties", "", true},
		{"/scm/ops/deploy-tools.git/info/refs", "service=git-upload-pack", true},
		{"/scm/ops/other.git/info/refs", "service=git-upload-pack", false},
		{"/scm/PROJ/x.git/info/refs", "service=git-upload-pack", true},
	}
	for _, c := range cases {
		d := p.Decide(http.MethodGet, c.path, c.query)
		if d.Allow != c.allow {
			t.Errorf("GET %s: allow=%v (%s: %s), want %v", c.path, d.Allow, d.Rule, d.Reason, c.allow)
		}
	}
	if _, err := New(Options{Profile: "bitbucket-dc-read", Repositories: []string{"PROJ"}}); err == nil {
		t.Error("scope entry without / accepted")
	}
}

func TestScopeCoversEveryRepositoryPath(t *testing.T) {
	as, err := New(Options{Profile: "bitbucket-dc-appsec", Repositories: []string{"PROJ/*"}})
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		method, path string
		allow        bool
	}{
		{"GET", "/rest/git-lfs/storage/PROJ/app/" + strings.Repeat("a", 64), true},
		{"GET", "/rest/git-lfs/storage/SECRET/vault/" + strings.Repeat("a", 64), false},
		{"POST", "/rest/build-status/1.0/commits/" + sha1, false},
		{"POST", "/rest/api/1.0/projects/PROJ/repos/app/commits/" + sha1 + "/builds", true},
		{"POST", "/rest/branch-utils/1.0/projects/SECRET/repos/vault/branches", false},
		{"PUT", "/rest/insights/1.0/projects/SECRET/repos/vault/commits/" + sha1 + "/reports/k", false},
		{"GET", "/rest/api/1.0/application-properties", true},
	}
	for _, c := range cases {
		if d := as.Decide(c.method, c.path, ""); d.Allow != c.allow {
			t.Errorf("%s %s: allow=%v (%s), want %v", c.method, c.path, d.Allow, d.Reason, c.allow)
		}
	}
	ar, _ := New(Options{Profile: "bitbucket-dc-access-review", Repositories: []string{"PROJ/*"}})
	if d := ar.Decide("GET", "/rest/api/1.0/admin/users", ""); !d.Allow {
		t.Errorf("directory reads under a scope: %s", d.Reason)
	}
}
