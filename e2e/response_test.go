package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func TestResponsesNeverPointInside(t *testing.T) {
	e := newEnv(t)
	repoPath := "/rest/api/1.0/projects/PROJ/repos/app"
	e.bb.AddRedirect(repoPath+"/browse/moved", e.bbURL+repoPath+"/browse/README.md?at=main")
	e.bb.AddRedirect(repoPath+"/browse/sso", "https://idp.corp.internal/login?service=bitbucket")
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	defer client.CloseIdleConnections()
	get := func(path string) *http.Response {
		req, _ := http.NewRequest("GET", e.scannerBase+path, nil)
		req.Header.Set("Authorization", "Bearer "+scannerToken)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	resp := get(repoPath + "/browse/moved")
	want := e.scannerBase + repoPath + "/browse/README.md?at=main"
	if resp.StatusCode != 302 || resp.Header.Get("Location") != want {
		t.Fatalf("redirect on the upstream: %d Location %q, want %q", resp.StatusCode, resp.Header.Get("Location"), want)
	}
	if resp := get(repoPath + "/browse/sso"); resp.StatusCode != 502 || resp.Header.Get("Location") != "" {
		t.Fatalf("redirect to another host: %d %q", resp.StatusCode, resp.Header.Get("Location"))
	}

	// Git LFS: the batch answer points into the tunnel and carries no
	// credential; the object comes through the tunnel.
	content := []byte("large binary asset\n")
	oid := e.bb.AddLFSObject(content)
	status, hdr, body := e.do("POST", e.scannerBase+"/scm/proj/app.git/info/lfs/objects/batch", scannerToken,
		strings.NewReader(`{"operation":"download","transfers":["basic"],"objects":[{"oid":"`+oid+`","size":19}]}`),
		map[string]string{"Accept": "application/vnd.git-lfs+json", "Content-Type": "application/vnd.git-lfs+json"})
	if status != 200 {
		t.Fatalf("batch: %d %s", status, body)
	}
	if strings.Contains(body, bitbucketPAT) || strings.Contains(body, e.bbURL) || strings.Contains(body, `"header"`) {
		t.Fatalf("batch answer leaks the upstream: %s", body)
	}
	var batch struct {
		Objects []struct {
			Actions map[string]struct {
				Href string `json:"href"`
			} `json:"actions"`
		} `json:"objects"`
	}
	if err := json.Unmarshal([]byte(body), &batch); err != nil || len(batch.Objects) != 1 {
		t.Fatalf("batch: %v %s", err, body)
	}
	href := batch.Objects[0].Actions["download"].Href
	if !strings.HasPrefix(href, e.scannerBase+"/rest/git-lfs/storage/PROJ/app/") || hdr.Get("Content-Length") != "" && hdr.Get("Content-Length") != itoa(len(body)) {
		t.Fatalf("download href %q", href)
	}
	status, _, obj := e.do("GET", href, scannerToken, nil, nil)
	if status != 200 || obj != string(content) {
		t.Fatalf("object through the tunnel: %d %q", status, obj)
	}

	// A Bitbucket that gzips the batch answer (git-lfs offers gzip): the
	// agent unpacks it to rewrite it, and it leaves plain.
	e.bb.GzipLFSBatch.Store(true)
	defer e.bb.GzipLFSBatch.Store(false)
	status, hdr, body = e.do("POST", e.scannerBase+"/scm/proj/app.git/info/lfs/objects/batch", scannerToken,
		strings.NewReader(`{"operation":"download","transfers":["basic"],"objects":[{"oid":"`+oid+`","size":19}]}`),
		map[string]string{"Accept": "application/vnd.git-lfs+json", "Content-Type": "application/vnd.git-lfs+json", "Accept-Encoding": "gzip"})
	if status != 200 || hdr.Get("Content-Encoding") != "" {
		t.Fatalf("gzipped batch: %d, Content-Encoding %q: %s", status, hdr.Get("Content-Encoding"), body)
	}
	if strings.Contains(body, bitbucketPAT) || strings.Contains(body, e.bbURL) || strings.Contains(body, `"header"`) {
		t.Fatalf("gzipped batch answer leaks the upstream: %s", body)
	}
	batch.Objects = nil
	if err := json.Unmarshal([]byte(body), &batch); err != nil || len(batch.Objects) != 1 || batch.Objects[0].Actions["download"].Href != href {
		t.Fatalf("gzipped batch: %v %s", err, body)
	}
}

func itoa(n int) string {
	b, _ := json.Marshal(n)
	return string(b)
}

func TestRealGitLFSCloneThroughTunnel(t *testing.T) {
	if _, err := exec.LookPath("git-lfs"); err != nil {
		t.Fatal("git-lfs not installed: run make deps")
	}
	e := newEnv(t)
	// git-lfs's Go client offers gzip; this Bitbucket takes it up.
	e.bb.GzipLFSBatch.Store(true)
	content := bytes.Repeat([]byte("ferry lfs object\n"), 4096)
	oid := e.bb.AddLFSObject(content)
	// A repository whose asset.bin is an LFS pointer, as git-lfs commits it.
	work := t.TempDir()
	for _, args := range [][]string{{"init", "-q", "-b", "main"}} {
		if _, err := testrig.Git(work, args...); err != nil {
			t.Fatal(err)
		}
	}
	os.WriteFile(filepath.Join(work, ".gitattributes"), []byte("*.bin filter=lfs diff=lfs merge=lfs -text\n"), 0o644)
	os.WriteFile(filepath.Join(work, "asset.bin"), []byte(fmt.Sprintf("version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n", oid, len(content))), 0o644)
	for _, args := range [][]string{{"add", "-A"}, {"commit", "-q", "-m", "add asset"}, {"clone", "-q", "--bare", ".", filepath.Join(e.dir, "git", "proj", "assets.git")}} {
		if _, err := testrig.Git(work, args...); err != nil {
			t.Fatal(err)
		}
	}
	dst := filepath.Join(t.TempDir(), "assets")
	_, err := testrig.Git("", "-c", "http.extraHeader=Authorization: Bearer "+scannerToken,
		"-c", "filter.lfs.process=git-lfs filter-process", "-c", "filter.lfs.smudge=git-lfs smudge -- %f",
		"-c", "filter.lfs.clean=git-lfs clean -- %f", "-c", "filter.lfs.required=true",
		"clone", "-q", e.scannerBase+"/scm/proj/assets.git", dst)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(dst, "asset.bin"))
	if err != nil || !bytes.Equal(got, content) {
		t.Fatalf("asset.bin is %d bytes (%v), want the %d-byte LFS object", len(got), err, len(content))
	}
	gzipped := false
	for _, r := range e.bb.Seen() {
		if strings.HasSuffix(r.Path, "/info/lfs/objects/batch") && strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
			gzipped = true
		}
	}
	if !gzipped {
		t.Fatal("git-lfs's batch request reached Bitbucket without offering gzip; the gzipped answer was not tried")
	}
}
