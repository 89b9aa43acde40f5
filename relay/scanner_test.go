package relay

import (
	"testing"

	"github.com/hashicorp/yamux"
)

func TestSplitScannerPath(t *testing.T) {
	cases := []struct {
		uri, tunnel, upstream, rest string
		ok                          bool
	}{
		{"/t/acme/bitbucket/scm/p/r.git/info/refs?service=git-upload-pack", "acme", "bitbucket", "/scm/p/r.git/info/refs", true},
		{"/t/acme/bitbucket", "acme", "bitbucket", "/", true},
		{"/t/acme/bitbucket/", "acme", "bitbucket", "/", true},
		{"/t/acme/bitbucket/a%2Fb", "acme", "bitbucket", "/a%2Fb", true},
		{"/t/acme", "", "", "", false},
		{"/t/ACME/bitbucket/x", "", "", "", false},
		{"/t/../bitbucket/x", "", "", "", false},
		{"/x/acme/bitbucket/", "", "", "", false},
	}
	for _, c := range cases {
		tu, up, rest, ok := splitScannerPath(c.uri)
		if ok != c.ok || tu != c.tunnel || up != c.upstream || rest != c.rest {
			t.Errorf("%s: got %q %q %q %v", c.uri, tu, up, rest, ok)
		}
	}
}

func TestPickLeastInFlightSkipsDraining(t *testing.T) {
	// Sessions are only asked IsClosed; an unstarted one reports open.
	open := func() *yamux.Session { return &yamux.Session{} }
	a, b, c := &agentConn{id: "a", sess: open()}, &agentConn{id: "b", sess: open()}, &agentConn{id: "c", sess: open()}
	tn := &tunnel{id: "t"}
	for _, x := range []*agentConn{a, b, c} {
		tn.add(x)
	}
	a.inflight.Store(5)
	b.inflight.Store(1)
	c.inflight.Store(3)
	if got := tn.pick(nil); got != b {
		t.Fatalf("picked %s, want b", got.id)
	}
	b.draining.Store(true)
	if got := tn.pick(nil); got != c {
		t.Fatalf("picked %s, want c (b drains)", got.id)
	}
	if got := tn.pick(c); got != a {
		t.Fatalf("picked %s, want a (c excluded)", got.id)
	}
	tn.remove(a)
	tn.remove(c)
	if got := tn.pick(nil); got != nil {
		t.Fatalf("picked %s from only a draining connection", got.id)
	}
}
