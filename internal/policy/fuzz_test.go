package policy

import (
	"bytes"
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
