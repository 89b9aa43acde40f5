package testrig

import (
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/cgi"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Bitbucket is a stand-in for a Bitbucket Data Center instance: git smart
// HTTP through the real `git http-backend` under /scm/, and the REST
// endpoints ferry's profiles cover, answering in Bitbucket's JSON shapes
// (paged lists with size/limit/isLastPage/values/start, errors as
// {"errors":[{context,message,exceptionName}]}).
//
// Like Bitbucket with public access off, every request needs the PAT as a
// bearer token or basic password; an authenticated response carries the
// user in X-AUSERNAME.
type Bitbucket struct {
	GitRoot string // bare repositories at GitRoot/{project}/{slug}.git
	Token   string // the PAT it accepts
	User    string // the PAT's user, reported in X-AUSERNAME

	// TokenExpiryDays is what the token list reports for the PAT in use
	// (0: 90 days; negative: none); a test may change it as it runs.
	TokenExpiryDays atomic.Int64
	// GzipLFSBatch: LFS batch answers are gzipped for clients that
	// accept it, as by a Bitbucket whose compression covers their type.
	GzipLFSBatch atomic.Bool

	inFlight atomic.Int64 // requests being answered now

	mu        sync.Mutex
	redirects map[string]string // path -> Location, answered with 302
	seen      []SeenRequest
	synthetic map[string]Synthetic // "PROJ/slug/path" -> generated file
	lfs       map[string][]byte    // oid -> object
}

// AddRedirect answers requests for path with 302 to location.
func (b *Bitbucket) AddRedirect(path, location string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.redirects == nil {
		b.redirects = map[string]string{}
	}
	b.redirects[path] = location
}

// AddLFSObject stores an LFS object and returns its oid (sha256).
func (b *Bitbucket) AddLFSObject(content []byte) string {
	sum := sha256.Sum256(content)
	oid := hex.EncodeToString(sum[:])
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.lfs == nil {
		b.lfs = map[string][]byte{}
	}
	b.lfs[oid] = content
	return oid
}

// SeenRequest is what the upstream received, for tests to check what did
// (and did not) cross the tunnel.
type SeenRequest struct {
	Method, Path, RawPath, Query string
	Header                       http.Header
}

// Synthetic is a large generated file served by the raw endpoint without
// being stored anywhere: Size bytes from a ChaCha8 stream seeded by Seed,
// served at BytesPerSec if set (a slow upstream).
type Synthetic struct {
	Size        int64
	Seed        [32]byte
	BytesPerSec int64
}

// Reader returns the synthetic file's content.
func (s Synthetic) Reader() io.Reader {
	return io.LimitReader(rand.NewChaCha8(s.Seed), s.Size)
}

// serve writes the content, paced when BytesPerSec is set.
func (s Synthetic) serve(w http.ResponseWriter) {
	src := s.Reader()
	if s.BytesPerSec <= 0 {
		io.Copy(w, src)
		return
	}
	chunk := max(s.BytesPerSec/20, 1) // 20 writes a second
	rc := http.NewResponseController(w)
	for {
		n, err := io.CopyN(w, src, chunk)
		rc.Flush()
		if n < chunk || err != nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// AddSynthetic serves a generated file at
// /rest/api/1.0/projects/{project}/repos/{slug}/raw/{path}.
func (b *Bitbucket) AddSynthetic(project, slug, path string, s Synthetic) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.synthetic == nil {
		b.synthetic = map[string]Synthetic{}
	}
	b.synthetic[strings.ToUpper(project)+"/"+slug+"/"+path] = s
}

// Seen returns the requests received so far.
func (b *Bitbucket) Seen() []SeenRequest {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]SeenRequest(nil), b.seen...)
}

// InFlight is how many requests it is answering now.
func (b *Bitbucket) InFlight() int64 { return b.inFlight.Load() }

// ServeHTTP implements http.Handler.
func (b *Bitbucket) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.inFlight.Add(1)
	defer b.inFlight.Add(-1)
	b.mu.Lock()
	b.seen = append(b.seen, SeenRequest{Method: r.Method, Path: r.URL.Path, RawPath: r.URL.EscapedPath(), Query: r.URL.RawQuery, Header: r.Header.Clone()})
	b.mu.Unlock()

	if !b.authenticated(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="Bitbucket"`)
		bbError(w, http.StatusUnauthorized, "Authentication failed. Please check your credentials and try again.",
			"com.atlassian.bitbucket.auth.IncorrectPasswordAuthenticationException")
		return
	}
	w.Header().Set("X-AUSERNAME", b.User)
	w.Header().Set("X-AREQUESTID", "@"+strconv.Itoa(rand.IntN(1<<30))+"x1")
	b.mu.Lock()
	loc, redirect := b.redirects[r.URL.Path]
	b.mu.Unlock()
	if redirect {
		http.Redirect(w, r, loc, http.StatusFound)
		return
	}
	switch {
	case r.URL.Path == SinkPath:
		serveSink(w, r)
	case strings.HasSuffix(r.URL.Path, "/info/lfs/objects/batch") && strings.HasPrefix(r.URL.Path, "/scm/"):
		b.serveLFSBatch(w, r)
	case strings.HasPrefix(r.URL.Path, "/rest/git-lfs/storage/"):
		b.serveLFSObject(w, r)
	case r.URL.Path == "/rest/access-tokens/1.0/users/"+b.User:
		b.serveTokens(w, r)
	case strings.HasPrefix(r.URL.Path, "/scm/"):
		b.serveGit(w, r)
	case strings.HasPrefix(r.URL.Path, "/rest/api/1.0/") || strings.HasPrefix(r.URL.Path, "/rest/api/latest/"):
		b.serveREST(w, r)
	default:
		bbError(w, http.StatusNotFound, "Not found: "+r.URL.Path, "")
	}
}

// SinkPath is a test-only endpoint (not Bitbucket's): it reads a POST body
// and answers {"bytes": n, "sha256": hex}, so tests can check that large
// request bodies cross the tunnel whole.
const SinkPath = "/rest/ferry-test/sink"

func serveSink(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		bbError(w, http.StatusMethodNotAllowed, "POST only", "")
		return
	}
	h := sha256.New()
	n, err := io.Copy(h, r.Body)
	if err != nil {
		bbError(w, http.StatusBadRequest, "reading body: "+err.Error(), "")
		return
	}
	writeJSON(w, map[string]any{"bytes": n, "sha256": hex.EncodeToString(h.Sum(nil))})
}

func (b *Bitbucket) authenticated(r *http.Request) bool {
	if h := r.Header.Get("Authorization"); h == "Bearer "+b.Token {
		return true
	}
	_, pw, ok := r.BasicAuth()
	return ok && pw == b.Token
}

func (b *Bitbucket) serveGit(w http.ResponseWriter, r *http.Request) {
	git, err := exec.LookPath("git")
	if err != nil {
		bbError(w, http.StatusInternalServerError, "git not installed", "")
		return
	}
	h := &cgi.Handler{
		Path: git,
		Args: []string{"http-backend"},
		Root: "/scm",
		Env: []string{
			"GIT_PROJECT_ROOT=" + b.GitRoot, "GIT_HTTP_EXPORT_ALL=1",
			"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "REMOTE_USER=" + b.User,
		},
		Stderr: io.Discard,
	}
	// Bitbucket's git URLs use the project key in lower case.
	r2 := r.Clone(r.Context())
	parts := strings.SplitN(strings.TrimPrefix(r.URL.Path, "/scm/"), "/", 2)
	if len(parts) == 2 {
		r2.URL.Path = "/scm/" + strings.ToLower(parts[0]) + "/" + parts[1]
	}
	h.ServeHTTP(w, r2)
}

// serveLFSBatch answers the Git LFS batch API as Bitbucket does: actions
// with absolute hrefs on its own base URL. Like some servers, it puts an
// Authorization header into each action, which ferry must not pass on.
func (b *Bitbucket) serveLFSBatch(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Operation string `json:"operation"`
		Objects   []struct {
			OID  string `json:"oid"`
			Size int64  `json:"size"`
		} `json:"objects"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 1<<20)).Decode(&req); err != nil {
		bbError(w, http.StatusBadRequest, err.Error(), "")
		return
	}
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/scm/"), "/")
	project, slug := strings.ToUpper(parts[0]), strings.TrimSuffix(parts[1], ".git")
	var objs []any
	for _, o := range req.Objects {
		b.mu.Lock()
		content, ok := b.lfs[o.OID]
		b.mu.Unlock()
		if !ok {
			objs = append(objs, map[string]any{"oid": o.OID, "size": o.Size, "error": map[string]any{"code": 404, "message": "Object does not exist"}})
			continue
		}
		objs = append(objs, map[string]any{"oid": o.OID, "size": len(content), "authenticated": true, "actions": map[string]any{
			"download": map[string]any{
				"href":       baseURL(r) + "/rest/git-lfs/storage/" + project + "/" + slug + "/" + o.OID,
				"header":     map[string]string{"Authorization": r.Header.Get("Authorization")},
				"expires_in": 3600,
			},
		}})
	}
	w.Header().Set("Content-Type", "application/vnd.git-lfs+json")
	var out io.Writer = w
	if b.GzipLFSBatch.Load() && strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
		w.Header().Set("Content-Encoding", "gzip")
		zw := gzip.NewWriter(w)
		defer zw.Close()
		out = zw
	}
	json.NewEncoder(out).Encode(map[string]any{"transfer": "basic", "objects": objs})
}

// serveTokens lists the user's HTTP access tokens as Bitbucket does; the
// PAT in use was created 30 days ago with a 90-day expiry unless
// TokenExpiryDays says otherwise (negative: no expiry).
func (b *Bitbucket) serveTokens(w http.ResponseWriter, r *http.Request) {
	days := b.TokenExpiryDays.Load()
	if days == 0 {
		days = 90
	}
	created := time.Now().Add(-30 * 24 * time.Hour)
	tok := map[string]any{
		"id": "123456789012", "name": "ferry", "createdDate": created.UnixMilli(),
		"lastAuthenticated": time.Now().UnixMilli(), "permissions": []string{"PROJECT_READ", "REPO_READ"},
		"user": users()[2],
	}
	if days > 0 {
		tok["expiryDays"] = days
	}
	old := map[string]any{"id": "999", "name": "old", "createdDate": created.Add(-time.Hour).UnixMilli(), "lastAuthenticated": created.UnixMilli(), "expiryDays": 1}
	writePage(w, r, []any{old, tok})
}

func (b *Bitbucket) serveLFSObject(w http.ResponseWriter, r *http.Request) {
	parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/rest/git-lfs/storage/"), "/")
	b.mu.Lock()
	content, ok := b.lfs[parts[len(parts)-1]]
	b.mu.Unlock()
	if len(parts) != 3 || !ok {
		bbError(w, http.StatusNotFound, "Object does not exist", "")
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Write(content)
}

func (b *Bitbucket) serveREST(w http.ResponseWriter, r *http.Request) {
	_, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/rest/api/"), "/")
	seg := strings.Split(strings.Trim(rest, "/"), "/")
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		bbError(w, http.StatusMethodNotAllowed, "Method "+r.Method+" is not supported by the ferry stand-in", "")
		return
	}
	switch {
	case len(seg) == 1 && seg[0] == "application-properties":
		writeJSON(w, map[string]any{"version": "8.19.1", "buildNumber": "8019001", "buildDate": "1730000000000", "displayName": "Bitbucket"})
	case len(seg) == 1 && seg[0] == "projects":
		var vals []any
		for _, p := range b.projects() {
			vals = append(vals, b.projectJSON(r, p))
		}
		writePage(w, r, vals)
	case len(seg) >= 2 && seg[0] == "projects":
		b.serveProject(w, r, strings.ToUpper(seg[1]), seg[2:])
	case len(seg) == 1 && seg[0] == "users", len(seg) == 2 && seg[0] == "admin" && seg[1] == "users":
		writePage(w, r, users())
	case len(seg) == 2 && seg[0] == "admin" && seg[1] == "groups":
		writePage(w, r, []any{map[string]any{"name": "stash-users", "deletable": true}, map[string]any{"name": "security", "deletable": true}})
	default:
		bbError(w, http.StatusNotFound, "No resource at "+r.URL.Path, "")
	}
}

func (b *Bitbucket) serveProject(w http.ResponseWriter, r *http.Request, key string, seg []string) {
	if !b.projectExists(key) {
		bbError(w, http.StatusNotFound, "Project "+key+" does not exist.", "com.atlassian.bitbucket.project.NoSuchProjectException")
		return
	}
	if len(seg) == 0 {
		writeJSON(w, b.projectJSON(r, key))
		return
	}
	if len(seg) == 2 && seg[0] == "permissions" && seg[1] == "users" {
		writePage(w, r, permissions("PROJECT_READ"))
		return
	}
	if seg[0] != "repos" {
		bbError(w, http.StatusNotFound, "No resource at "+r.URL.Path, "")
		return
	}
	if len(seg) == 1 {
		var vals []any
		for _, slug := range b.repos(key) {
			vals = append(vals, b.repoJSON(r, key, slug))
		}
		writePage(w, r, vals)
		return
	}
	slug := seg[1]
	bare := filepath.Join(b.GitRoot, strings.ToLower(key), slug+".git")
	if st, err := os.Stat(bare); err != nil || !st.IsDir() {
		bbError(w, http.StatusNotFound, "Repository "+key+"/"+slug+" does not exist.", "com.atlassian.bitbucket.repository.NoSuchRepositoryException")
		return
	}
	switch {
	case len(seg) == 2:
		writeJSON(w, b.repoJSON(r, key, slug))
	case len(seg) == 4 && seg[2] == "permissions" && seg[3] == "users":
		writePage(w, r, permissions("REPO_WRITE"))
	case seg[2] == "branches":
		b.serveBranches(w, r, bare)
	case seg[2] == "raw" && len(seg) > 3:
		b.serveRaw(w, r, key, slug, bare, strings.Join(seg[3:], "/"))
	default:
		bbError(w, http.StatusNotFound, "No resource at "+r.URL.Path, "")
	}
}

func (b *Bitbucket) serveBranches(w http.ResponseWriter, r *http.Request, bare string) {
	out, err := Git(bare, "for-each-ref", "--format=%(refname) %(objectname)", "refs/heads/")
	if err != nil {
		bbError(w, http.StatusInternalServerError, err.Error(), "")
		return
	}
	head, _ := Git(bare, "symbolic-ref", "HEAD")
	var vals []any
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		ref, sha, ok := strings.Cut(line, " ")
		if !ok {
			continue
		}
		vals = append(vals, map[string]any{
			"id": ref, "displayId": strings.TrimPrefix(ref, "refs/heads/"), "type": "BRANCH",
			"latestCommit": sha, "latestChangeset": sha, "isDefault": ref == strings.TrimSpace(head),
		})
	}
	writePage(w, r, vals)
}

func (b *Bitbucket) serveRaw(w http.ResponseWriter, r *http.Request, key, slug, bare, path string) {
	b.mu.Lock()
	syn, ok := b.synthetic[key+"/"+slug+"/"+path]
	b.mu.Unlock()
	if ok {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(syn.Size, 10))
		if r.Method == http.MethodGet {
			syn.serve(w)
		}
		return
	}
	at := r.URL.Query().Get("at")
	if at == "" {
		at = "HEAD"
	}
	cmd := exec.CommandContext(r.Context(), "git", "cat-file", "blob", at+":"+path)
	cmd.Dir = bare
	cmd.Env = GitEnv()
	out, err := cmd.StdoutPipe()
	if err != nil {
		bbError(w, http.StatusInternalServerError, err.Error(), "")
		return
	}
	if err := cmd.Start(); err != nil {
		bbError(w, http.StatusInternalServerError, err.Error(), "")
		return
	}
	var first [1]byte
	n, _ := io.ReadFull(out, first[:])
	if n == 0 {
		cmd.Wait()
		bbError(w, http.StatusNotFound, "The path \""+path+"\" does not exist at revision \""+at+"\"", "com.atlassian.bitbucket.content.NoSuchPathException")
		return
	}
	w.Header().Set("Content-Type", "text/plain;charset=UTF-8")
	w.Write(first[:])
	io.Copy(w, out)
	cmd.Wait()
}

// users is the stand-in's user directory, in Bitbucket's ApplicationUser shape.
func users() []any {
	var out []any
	for i, n := range []string{"alice", "bob", "svc-ferry"} {
		out = append(out, map[string]any{
			"name": n, "emailAddress": n + "@corp.example", "id": 100 + i, "displayName": strings.ToUpper(n[:1]) + n[1:],
			"active": true, "slug": n, "type": "NORMAL",
		})
	}
	return out
}

func permissions(perm string) []any {
	var out []any
	for _, u := range users() {
		out = append(out, map[string]any{"user": u, "permission": perm})
	}
	return out
}

func (b *Bitbucket) projects() []string {
	ents, _ := os.ReadDir(b.GitRoot)
	var keys []string
	for _, e := range ents {
		if e.IsDir() {
			keys = append(keys, strings.ToUpper(e.Name()))
		}
	}
	sort.Strings(keys)
	return keys
}

func (b *Bitbucket) projectExists(key string) bool {
	st, err := os.Stat(filepath.Join(b.GitRoot, strings.ToLower(key)))
	return err == nil && st.IsDir()
}

func (b *Bitbucket) repos(key string) []string {
	ents, _ := os.ReadDir(filepath.Join(b.GitRoot, strings.ToLower(key)))
	var slugs []string
	for _, e := range ents {
		if s, ok := strings.CutSuffix(e.Name(), ".git"); ok && e.IsDir() {
			slugs = append(slugs, s)
		}
	}
	sort.Strings(slugs)
	return slugs
}

func baseURL(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

func (b *Bitbucket) projectJSON(r *http.Request, key string) map[string]any {
	return map[string]any{
		"key": key, "id": idOf(key), "name": key[:1] + strings.ToLower(key[1:]),
		"public": false, "type": "NORMAL",
		"links": map[string]any{"self": []any{map[string]string{"href": baseURL(r) + "/projects/" + key}}},
	}
}

func (b *Bitbucket) repoJSON(r *http.Request, key, slug string) map[string]any {
	base := baseURL(r)
	return map[string]any{
		"slug": slug, "id": idOf(key + "/" + slug), "name": slug, "hierarchyId": fmt.Sprintf("%020x", idOf(slug))[:20],
		"scmId": "git", "state": "AVAILABLE", "statusMessage": "Available", "forkable": true,
		"project": b.projectJSON(r, key), "public": false, "archived": false,
		"links": map[string]any{
			"clone": []any{map[string]string{"href": base + "/scm/" + strings.ToLower(key) + "/" + slug + ".git", "name": "http"}},
			"self":  []any{map[string]string{"href": base + "/projects/" + key + "/repos/" + slug + "/browse"}},
		},
	}
}

func idOf(s string) int {
	h := 7
	for _, c := range s {
		h = h*31 + int(c)
	}
	return h & 0xfffff
}

// writePage answers a paged list the way Bitbucket does (start, limit).
func writePage(w http.ResponseWriter, r *http.Request, vals []any) {
	start, _ := strconv.Atoi(r.URL.Query().Get("start"))
	limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
	if limit <= 0 || limit > 1000 {
		limit = 25
	}
	start = max(0, min(start, len(vals)))
	end := min(start+limit, len(vals))
	page := map[string]any{"size": end - start, "limit": limit, "isLastPage": end == len(vals), "values": append([]any{}, vals[start:end]...), "start": start}
	if end < len(vals) {
		page["nextPageStart"] = end
	}
	writeJSON(w, page)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json;charset=UTF-8")
	json.NewEncoder(w).Encode(v)
}

func bbError(w http.ResponseWriter, status int, msg, exception string) {
	w.Header().Set("Content-Type", "application/json;charset=UTF-8")
	w.WriteHeader(status)
	var exc any
	if exception != "" {
		exc = exception
	}
	json.NewEncoder(w).Encode(map[string]any{"errors": []any{map[string]any{"context": nil, "message": msg, "exceptionName": exc}}})
}
