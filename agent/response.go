package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/ferry-tunnel/ferry/internal/httpx"
)

// PublicBaseHeader carries, from relay to agent, the URL under which the
// scanner reaches this upstream (http://relay/t/{tunnel}/{upstream}). The
// agent uses it only to rewrite URLs in responses; requests are never
// routed by it.
const PublicBaseHeader = "X-Ferry-Public-Base"

// errOffHostRedirect: the upstream redirected somewhere else. The agent
// never follows redirects, and does not pass on ones that would send the
// scanner to another host.
var errOffHostRedirect = errors.New("upstream redirected to another host")

const maxLFSBatchResponse = 8 << 20

// parsePublicBase accepts the relay's public base if it is a plain
// http(s) URL; anything else is ignored.
func parsePublicBase(v string) string {
	u, err := url.Parse(v)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return ""
	}
	return strings.TrimSuffix(u.String(), "/")
}

// modifyResponse cleans what the upstream answers before it crosses the
// tunnel: cookies and configured headers go, URLs naming the upstream are
// turned into the scanner's URLs, and LFS batch answers lose the headers
// that would carry Bitbucket credentials.
func (u *upstream) modifyResponse(resp *http.Response) error {
	f, _ := resp.Request.Context().Value(forwardKey{}).(*forward)
	public := ""
	if f != nil {
		public = f.publicBase
	}
	h := resp.Header
	h.Del("Set-Cookie")
	for _, name := range u.cfg.HideResponseHeaders {
		h.Del(name)
	}
	for _, name := range []string{"Location", "Content-Location"} {
		v := h.Get(name)
		if v == "" {
			continue
		}
		nv, ours := u.rewriteURL(v, public)
		switch {
		case ours:
			h.Set(name, nv)
		case name == "Location" && resp.StatusCode >= 300 && resp.StatusCode < 400:
			return fmt.Errorf("%w (status %d)", errOffHostRedirect, resp.StatusCode)
		default:
			h.Del(name)
		}
	}
	// The prefix test first: ParseMediaType allocates, for every response.
	const lfs = "application/vnd.git-lfs+json"
	if ct := h.Get("Content-Type"); resp.StatusCode == http.StatusOK && len(ct) >= len(lfs) && strings.EqualFold(ct[:len(lfs)], lfs) {
		if mt, _, _ := mime.ParseMediaType(ct); mt == lfs {
			return u.rewriteLFSBatch(resp, public)
		}
	}
	return nil
}

// rewriteURL maps a URL on this upstream (its configured URL or one of its
// aliases, e.g. Bitbucket's own base URL) to the scanner's public base.
// ours is false for URLs elsewhere.
func (u *upstream) rewriteURL(raw, public string) (string, bool) {
	ref, err := url.Parse(raw)
	if err != nil {
		return "", false
	}
	for _, base := range u.bases {
		abs := base.ResolveReference(ref)
		if !strings.EqualFold(abs.Scheme, base.Scheme) || !strings.EqualFold(abs.Host, base.Host) {
			continue
		}
		rel, ok := strings.CutPrefix(abs.EscapedPath(), strings.TrimSuffix(base.EscapedPath(), "/"))
		if !ok || (rel != "" && rel[0] != '/') {
			continue
		}
		out := public + rel
		if out == "" {
			out = "/"
		}
		if abs.RawQuery != "" {
			out += "?" + abs.RawQuery
		}
		return out, true
	}
	return "", false
}

// rewriteLFSBatch rewrites action hrefs that point at the upstream to the
// scanner's URLs and drops their "header" maps: the agent adds the
// upstream credential itself, and Bitbucket may put one there.
func (u *upstream) rewriteLFSBatch(resp *http.Response, public string) error {
	// The scanner's Accept-Encoding reaches the upstream (git-lfs's Go
	// client offers gzip), so the answer may come compressed; it leaves
	// rewritten and plain.
	enc := strings.ToLower(strings.TrimSpace(resp.Header.Get("Content-Encoding")))
	src, _, err := httpx.Unpack(enc, resp.Body)
	switch {
	case errors.Is(err, httpx.ErrUnknownEncoding):
		resp.Body.Close()
		return fmt.Errorf("LFS batch response in Content-Encoding %q, which the agent cannot rewrite", enc)
	case err != nil:
		resp.Body.Close()
		return fmt.Errorf("LFS batch response: gzip: %w", err)
	}
	body, err := io.ReadAll(io.LimitReader(src, maxLFSBatchResponse+1))
	resp.Body.Close()
	if err != nil {
		return fmt.Errorf("read LFS batch response: %w", err)
	}
	if len(body) > maxLFSBatchResponse {
		return fmt.Errorf("LFS batch response larger than %d bytes", maxLFSBatchResponse)
	}
	var doc map[string]any
	if err := json.Unmarshal(body, &doc); err != nil {
		return fmt.Errorf("LFS batch response: %w", err)
	}
	objects, _ := doc["objects"].([]any)
	for _, o := range objects {
		obj, _ := o.(map[string]any)
		actions, _ := obj["actions"].(map[string]any)
		for name, a := range actions {
			act, _ := a.(map[string]any)
			href, _ := act["href"].(string)
			if href == "" {
				// Not an action git-lfs could follow (not an object, or
				// no href): dropped, as the agent cannot vouch for it.
				delete(actions, name)
				continue
			}
			nv, ours := u.rewriteURL(href, public)
			if !ours {
				delete(actions, name) // an action elsewhere cannot go through the tunnel
				continue
			}
			act["href"] = nv
			delete(act, "header")
		}
	}
	out, err := json.Marshal(doc)
	if err != nil {
		return err
	}
	resp.Body = io.NopCloser(bytes.NewReader(out))
	resp.ContentLength = int64(len(out))
	resp.Header.Set("Content-Length", strconv.Itoa(len(out)))
	resp.Header.Del("Content-Encoding")
	resp.TransferEncoding = nil
	return nil
}
