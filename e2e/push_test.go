package e2e

import (
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// gitTry runs git with the scanner token and returns output and error.
func gitTry(dir, tok string, args ...string) (string, error) {
	full := append([]string{"-c", "http.extraHeader=Authorization: Bearer " + tok}, args...)
	return testrig.Git(dir, full...)
}

func TestAppsecPushOnlyToFixPrefix(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	cfg := strings.Replace(w.agentYAML(r.AgentAddr(), ""), "profile: bitbucket-dc-read", "profile: bitbucket-dc-appsec", 1)
	a, arun := w.startAgentYAML(cfg)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() > 0 })
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket"
	bare := filepath.Join(w.dir, "git", "proj", "app.git")
	mainBefore, _ := testrig.Git(bare, "rev-parse", "refs/heads/main")

	dst := filepath.Join(t.TempDir(), "app")
	gitCmd(t, "", scannerToken, "clone", "-q", base+"/scm/proj/app.git", dst)
	gitCmd(t, dst, scannerToken, "checkout", "-q", "-b", "ferry-fix/cve-1")
	gitCmd(t, dst, scannerToken, "commit", "-q", "--allow-empty", "-m", "fix: bump dependency")
	gitCmd(t, dst, scannerToken, "push", "-q", "origin", "ferry-fix/cve-1")
	local := gitCmd(t, dst, scannerToken, "rev-parse", "HEAD")
	if got, err := testrig.Git(bare, "rev-parse", "refs/heads/ferry-fix/cve-1"); err != nil || strings.TrimSpace(got) != local {
		t.Fatalf("fix branch not pushed: %q %v", got, err)
	}

	refused := []struct{ name, refspec string }{
		{"push to main", "HEAD:main"},
		{"delete main", ":main"},
		{"new tag", "HEAD:refs/tags/v2"},
		{"two refs, one outside", "HEAD:ferry-fix/ok HEAD:main"},
	}
	for _, c := range refused {
		out, err := gitTry(dst, scannerToken, append([]string{"push", "origin"}, strings.Fields(c.refspec)...)...)
		if err == nil {
			t.Errorf("%s: push succeeded: %s", c.name, out)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, "remote: ferry: push refused") || !strings.Contains(msg, "! [remote rejected]") {
			t.Errorf("%s: git does not show why: %v", c.name, err)
		}
	}
	if after, _ := testrig.Git(bare, "rev-parse", "refs/heads/main"); after != mainBefore {
		t.Fatal("main moved")
	}
	if _, err := testrig.Git(bare, "rev-parse", "--verify", "-q", "refs/heads/ferry-fix/ok"); err == nil {
		t.Fatal("a push with one ref outside the prefix was partly applied")
	}
	// Deleting a fix branch is inside the prefix, so allowed.
	gitCmd(t, dst, scannerToken, "push", "-q", "origin", ":ferry-fix/cve-1")
}

func TestAccessReviewReadsPermissionsOnly(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	cfg := strings.Replace(w.agentYAML(r.AgentAddr(), ""), "profile: bitbucket-dc-read", "profile: bitbucket-dc-access-review", 1)
	a, arun := w.startAgentYAML(cfg)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() > 0 })
	e := &env{world: w, client: &http.Client{}}
	defer e.client.CloseIdleConnections()
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket"
	for _, p := range []string{"/rest/api/1.0/admin/users", "/rest/api/1.0/admin/groups", "/rest/api/1.0/projects/PROJ/permissions/users",
		"/rest/api/latest/projects/PROJ/repos/app/permissions/users", "/rest/api/1.0/projects"} {
		status, _, body := e.do("GET", base+p, scannerToken, nil, nil)
		if status != 200 || !strings.Contains(body, `"values"`) {
			t.Errorf("GET %s: %d %s", p, status, body)
		}
	}
	if _, err := gitTry("", scannerToken, "clone", "-q", base+"/scm/proj/app.git", filepath.Join(t.TempDir(), "x")); err == nil {
		t.Error("access-review profile allowed a clone")
	}
	status, _, _ := e.do("GET", base+"/rest/api/1.0/projects/PROJ/repos/app/raw/README.md", scannerToken, nil, nil)
	if status != 403 {
		t.Errorf("access-review profile read file content: %d", status)
	}
}
