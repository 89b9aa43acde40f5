package agent

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"testing"
)

// FuzzRewriteLFSBatch: whatever an upstream answers to an LFS batch
// request, the agent either refuses it or passes on a JSON document in
// which every action points at the scanner's public base and carries no
// "header" map (where Bitbucket may put a credential), with a
// Content-Length that matches, and never a compressed body it did not
// rewrite.
func FuzzRewriteLFSBatch(f *testing.F) {
	f.Add([]byte(`{"transfer":"basic","objects":[{"oid":"ab","size":3,"actions":{"download":{"href":"https://bb.internal:7990/bitbucket/rest/git-lfs/storage/P/r/ab","header":{"Authorization":"Basic c2VjcmV0"},"expires_in":3600}}}]}`), false)
	f.Add([]byte(`{"objects":[{"actions":{"download":{"href":"https://elsewhere.example/x"},"upload":{"href":"/bitbucket/rest/x"}}}]}`), true)
	f.Add([]byte(`{"objects":[{"actions":{"download":{"href":"https://bb.internal:7990/bitbucketevil/x"},"verify":{"href":"https://BB.INTERNAL:7990/bitbucket/%2e%2e/x"}}}]}`), false)
	f.Add([]byte(`{"objects":[{"actions":{"download":{"href":7}}},3,null,{"actions":[]}],"x":{"header":{}}}`), false)
	f.Add([]byte(`{"objects":`), false)
	f.Add([]byte(`[]`), true)
	f.Add([]byte(`{"objects":[{"actions":{"download":7,"upload":null}}]}`), false)

	base, _ := url.Parse("https://bb.internal:7990/bitbucket")
	alias, _ := url.Parse("http://bitbucket.example.com/bitbucket/")
	u := &upstream{base: base, bases: []*url.URL{base, alias}}
	const public = "https://relay.example/t/acme/bitbucket"

	f.Fuzz(func(t *testing.T, body []byte, gz bool) {
		sent := body
		resp := &http.Response{StatusCode: 200, Header: http.Header{}}
		if gz {
			var b bytes.Buffer
			zw := gzip.NewWriter(&b)
			zw.Write(body)
			zw.Close()
			sent = b.Bytes()
			resp.Header.Set("Content-Encoding", "gzip")
		}
		resp.Body = io.NopCloser(bytes.NewReader(sent))
		resp.Header.Set("Content-Length", strconv.Itoa(len(sent)))
		if err := u.rewriteLFSBatch(resp, public); err != nil {
			return
		}
		out, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		if resp.Header.Get("Content-Encoding") != "" {
			t.Fatalf("rewritten body still marked %q", resp.Header.Get("Content-Encoding"))
		}
		if resp.ContentLength != int64(len(out)) || resp.Header.Get("Content-Length") != strconv.Itoa(len(out)) {
			t.Fatalf("Content-Length %d / %q for %d bytes", resp.ContentLength, resp.Header.Get("Content-Length"), len(out))
		}
		var doc map[string]any
		if err := json.Unmarshal(out, &doc); err != nil {
			t.Fatalf("rewritten body is not JSON: %v\n%s", err, out)
		}
		objects, _ := doc["objects"].([]any)
		for _, o := range objects {
			obj, _ := o.(map[string]any)
			actions, _ := obj["actions"].(map[string]any)
			for name, a := range actions {
				act, _ := a.(map[string]any)
				if _, ok := act["header"]; ok {
					t.Fatalf("action %s kept its header map: %s", name, out)
				}
				href, _ := act["href"].(string)
				if href != public && !strings.HasPrefix(href, public+"/") {
					t.Fatalf("action %s points at %q, not the public base: %s", name, href, out)
				}
			}
		}
	})
}
