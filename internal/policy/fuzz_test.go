package policy

import (
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
		pol, _ := New("bitbucket-dc-read", nil, []string{"P/*"})
		d := pol.Decide("GET", raw, "")
		if d.Allow && d.Path != p {
			t.Fatalf("decision path %q differs from normalised %q", d.Path, p)
		}
	})
}
