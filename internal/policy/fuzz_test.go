package policy

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strings"
	"testing"
)

func FuzzNormalizePath(f *testing.F) {
	for _, s := range []string{"/rest/api/1.0/projects", "/a/%2e%2e/b", "/a//b", "/a;x", "/%c3%a9", "/a/%252f", "/scm/p/r.git/info/refs"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		p, err := NormalizePath(raw)
		if err != nil {
			return
		}
		// Whatever is accepted carries no traversal or separator trick, and
		// the policy decides on exactly that path.
		for _, seg := range strings.Split(p, "/") {
			if seg == "." || seg == ".." {
				t.Fatalf("%q normalised to %q with a dot segment", raw, p)
			}
		}
		if strings.Contains(p, "//") || strings.ContainsAny(p, "\\;\x00") {
			t.Fatalf("%q normalised to ambiguous %q", raw, p)
		}
		pol, _ := New(Options{Profile: "bitbucket-dc-read", Repositories: []string{"P/*"}})
		d := pol.Decide("GET", raw, "")
		if d.Allow && d.Path != p {
			t.Fatalf("decision path %q differs from normalised %q", d.Path, p)
		}
	})
}

func FuzzReceivePackCommands(f *testing.F) {
	f.Add([]byte(pushBody(zero + " " + sha1 + " refs/heads/ferry-fix/a")))
	f.Add([]byte(pushBody(sha1+" "+sha2+" refs/heads/main", sha1+" "+zero+" refs/heads/x")))
	f.Add([]byte("0000"))
	f.Add([]byte("0004"))
	f.Add([]byte("fff0"))
	f.Fuzz(func(t *testing.T, b []byte) {
		rp, consumed, err := ParseReceivePackCommands(bytes.NewReader(b))
		if err != nil {
			return
		}
		// What was consumed is a prefix of the input: replaying it before
		// the rest reproduces the body exactly.
		if !bytes.HasPrefix(b, consumed) {
			t.Fatalf("consumed bytes are not a prefix of the body")
		}
		for _, c := range rp.Commands {
			if !validRef(c.Ref) || !isObjectID(c.Old) || !isObjectID(c.New) {
				t.Fatalf("accepted malformed command %+v", c)
			}
		}
	})
}

// FuzzCheckBody feeds the body checks (LFS batch, branch create, file
// edit, each plain or gzipped) arbitrary bodies. Whatever a check allows
// must be forwarded byte for byte as it was judged, and a second,
// independent reading of the body, the way a server that was never told
// about ferry reads it, must agree with the verdict: the branch written
// lies under the push prefix, the LFS operation is a download.
func FuzzCheckBody(f *testing.F) {
	// kind picks the check: an index into kinds.
	kinds := []Inspection{InspectLFSBatch, InspectBranchCreate, InspectFileEdit}
	form := func(parts ...string) (string, string) {
		var b strings.Builder
		for i := 0; i+1 < len(parts); i += 2 {
			fmt.Fprintf(&b, "--xyz\r\nContent-Disposition: form-data; name=%q\r\n\r\n%s\r\n", parts[i], parts[i+1])
		}
		b.WriteString("--xyz--\r\n")
		return "multipart/form-data; boundary=xyz", b.String()
	}
	f.Add(uint8(0), "", false, []byte(`{"operation":"download","objects":[]}`))
	f.Add(uint8(0), "", true, []byte(`{"operation":"upload"}`))
	f.Add(uint8(1), "", false, []byte(`{"name":"ferry-fix/a","startPoint":"main"}`))
	f.Add(uint8(1), "", true, []byte(`{"name":"refs/heads/ferry-fix/a"}`))
	ct, body := form("content", "x", "branch", "ferry-fix/a")
	f.Add(uint8(2), ct, false, []byte(body))
	ct, body = form("branch", "ferry-fix/a", "sourceBranch", "main")
	f.Add(uint8(2), ct, true, []byte(body))
	f.Add(uint8(2), ct, false, []byte("--xyz\r\nContent-Disposition: form-data; name=\"branch\"\r\n"+
		"Content-Transfer-Encoding: quoted-printable\r\n\r\n=66erry-fix/a\r\n--xyz--\r\n"))

	// A form under each of two boundaries, told apart only by RFC 2231.
	f.Add(uint8(2), "multipart/form-data; boundary=AAA; boundary*=utf-8''BBB", false, []byte(
		"--AAA\r\nContent-Disposition: form-data; name=\"branch\"\r\n\r\nmain\r\n--AAA--\r\n"+
			"--BBB\r\nContent-Disposition: form-data; name=\"branch\"\r\n\r\nferry-fix/a\r\n--BBB--\r\n"))

	// Parts a lenient server names branch and Go does not, or the other
	// way round.
	for _, cd := range []string{`form-data-x; name="branch"`, `form-data; name="branch"; name="x"`, `form-data; name*=utf-8''branch`} {
		f.Add(uint8(2), "multipart/form-data; boundary=xyz", false, []byte(
			"--xyz\r\nContent-Disposition: "+cd+"\r\n\r\nmain\r\n"+
				"--xyz\r\nContent-Disposition: form-data; name=\"branch\"\r\n\r\nferry-fix/a\r\n--xyz--\r\n"))
	}

	// The only branch field, in a form a lenient server does not read: it
	// would commit to the default branch.
	f.Add(uint8(2), "multipart/form-data; boundary=xyz", false, []byte(
		"--xyz\r\nContent-Disposition: form-data; name*=utf-8''branch\r\n\r\nferry-fix/a\r\n--xyz--\r\n"))

	pol, err := New(Options{Profile: "bitbucket-dc-appsec"})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, kind uint8, contentType string, gz bool, body []byte) {
		d := Decision{Allow: true, Rule: "fuzz", Inspect: kinds[int(kind)%len(kinds)]}
		hdr := http.Header{"Content-Type": {contentType}}
		sent := body
		if gz {
			var z bytes.Buffer
			zw := gzip.NewWriter(&z)
			zw.Write(body)
			zw.Close()
			sent = z.Bytes()
			hdr.Set("Content-Encoding", "gzip")
		}
		out, err := pol.CheckBody(d, hdr, bytes.NewReader(sent))
		if err != nil {
			var r *Refusal
			if !errors.As(err, &r) {
				t.Fatalf("an in-memory body failed with %v, not a refusal", err)
			}
			if r.Status != http.StatusBadRequest && r.Status != http.StatusForbidden && r.Status != http.StatusRequestEntityTooLarge {
				t.Fatalf("refusal with status %d", r.Status)
			}
			return
		}
		if out.Decoded != gz {
			t.Fatalf("Decoded=%v for a body sent gzipped=%v", out.Decoded, gz)
		}
		fwd, err := io.ReadAll(out.R)
		if err != nil || !bytes.Equal(fwd, body) {
			t.Fatalf("the forwarded body differs from the judged one (%v)", err)
		}
		switch d.Inspect {
		case InspectLFSBatch:
			var m map[string]json.RawMessage
			var op string
			if json.Unmarshal(body, &m) != nil || json.Unmarshal(m["operation"], &op) != nil || op != "download" {
				t.Fatalf("allowed an LFS batch that is not plainly a download: %q", body)
			}
		case InspectBranchCreate:
			var m map[string]json.RawMessage
			var name string
			if json.Unmarshal(body, &m) != nil || json.Unmarshal(m["name"], &name) != nil || !underPrefix(name) {
				t.Fatalf("allowed a branch create outside the prefix: %q", body)
			}
		case InspectFileEdit:
			branches := rawFormValues(t, contentType, body, "branch")
			if len(branches) != 1 || !underPrefix(strings.TrimSpace(branches[0])) {
				t.Fatalf("allowed a file edit on branches %q", branches)
			}
		}
	})
}

// underPrefix is the push prefix check written out plainly, for a branch
// name or a full ref.
func underPrefix(name string) bool {
	if !strings.HasPrefix(name, "refs/") {
		name = "refs/heads/" + name
	}
	return strings.HasPrefix(name, DefaultPushRefPrefix) && !strings.Contains(name, "..")
}

// rawFormValues reads a multipart form's values for name as a lenient
// server sees them: it decodes no Content-Transfer-Encoding (RFC 7578
// retired it) and names parts as lenientFormName does.
func rawFormValues(t *testing.T, contentType string, body []byte, name string) []string {
	_, params, err := mime.ParseMediaType(contentType)
	if err != nil {
		t.Fatalf("allowed a form whose Content-Type does not parse: %v", err)
	}
	// Such a server takes only plain parameters; Go's parser above also
	// takes RFC 2231 ones, and may have picked one of those.
	if strings.Contains(contentType, "*") {
		t.Fatalf("allowed a form whose Content-Type has an extended parameter: %q", contentType)
	}
	mr := multipart.NewReader(bytes.NewReader(body), params["boundary"])
	var out []string
	for {
		part, err := mr.NextRawPart()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatalf("allowed a form that does not parse: %v", err)
		}
		if lenientFormName(part.Header) == name {
			v, err := io.ReadAll(part)
			if err != nil {
				t.Fatalf("allowed a form whose %s does not read: %v", name, err)
			}
			out = append(out, string(v))
		}
	}
}

// lenientFormName names a part the way a lenient multipart parser does:
// the first Content-Disposition, if it starts with form-data (any case),
// and its first plain name parameter; RFC 2231 forms are unknown to it.
func lenientFormName(h textproto.MIMEHeader) string {
	cd := h.Get("Content-Disposition")
	if !strings.HasPrefix(strings.ToLower(cd), "form-data") {
		return ""
	}
	var pieces []string
	start, quoted := 0, false
	for i := 0; i < len(cd); i++ {
		switch {
		case cd[i] == '\\' && quoted:
			i++
		case cd[i] == '"':
			quoted = !quoted
		case cd[i] == ';' && !quoted:
			pieces = append(pieces, cd[start:i])
			start = i + 1
		}
	}
	pieces = append(pieces, cd[start:])
	for _, p := range pieces[1:] {
		k, v, ok := strings.Cut(strings.TrimSpace(p), "=")
		if ok && strings.EqualFold(strings.TrimSpace(k), "name") {
			v = strings.TrimSpace(v)
			if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
				v = v[1 : len(v)-1]
			}
			return v
		}
	}
	return ""
}
