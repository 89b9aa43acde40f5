package registry

import (
	"context"
	"log/slog"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func newPair(t *testing.T, redisOptions ...string) (*testrig.Redis, *Redis, *Redis) {
	t.Helper()
	red, err := testrig.StartRedis(t.TempDir(), redisOptions...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(red.Stop)
	mk := func(self string) *Redis {
		r, err := NewRedis(red.URL(), self, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatal(err)
		}
		r.ttl = time.Second
		return r
	}
	a, b := mk("http://10.0.0.1:7443"), mk("http://10.0.0.2:7443")
	t.Cleanup(func() { a.c.Close(); b.c.Close() })
	return red, a, b
}

// running starts r's Run loop until the test ends (or stop is called).
func running(t *testing.T, r *Redis) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); r.Run(ctx) }()
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	return stop
}

// eventually polls cond for up to 5 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func TestOwnersHoldReleaseExpire(t *testing.T) {
	_, a, b := newPair(t)
	ctx := context.Background()
	stopA := running(t, a)
	a.Hold("acme")
	eventually(t, "a's entry", func() bool {
		got, err := b.Owners(ctx, "acme")
		return err == nil && slices.Equal(got, []string{"http://10.0.0.1:7443"})
	})
	if got, _ := a.Owners(ctx, "acme"); len(got) != 0 {
		t.Fatalf("a sees itself as another owner: %v", got)
	}
	if n, err := b.Replicas(ctx); err != nil || n != 1 {
		t.Fatalf("replicas: %d %v (only a has a heartbeat)", n, err)
	}
	a.Release("acme")
	eventually(t, "release", func() bool { got, _ := b.Owners(ctx, "acme"); return len(got) == 0 })
	// A replica that dies without releasing drops out after its TTL.
	a.Hold("acme")
	eventually(t, "a's entry again", func() bool { got, _ := b.Owners(ctx, "acme"); return len(got) == 1 })
	stopA()
	time.Sleep(1200 * time.Millisecond)
	if got, _ := b.Owners(ctx, "acme"); len(got) != 0 {
		t.Fatalf("expired entry still listed: %v", got)
	}
	if b.Problem() != "" {
		t.Fatalf("problem with a working Redis: %s", b.Problem())
	}
}

func TestRunRefreshesAndCloseRemoves(t *testing.T) {
	_, a, b := newPair(t)
	stop := running(t, a)
	a.Hold("acme")
	time.Sleep(1500 * time.Millisecond) // past the TTL: only the heartbeat keeps it
	if got, _ := b.Owners(context.Background(), "acme"); len(got) != 1 {
		t.Fatalf("heartbeat did not keep the entry: %v", got)
	}
	stop()
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	if got, _ := b.Owners(context.Background(), "acme"); len(got) != 0 {
		t.Fatalf("entry left after a clean shutdown: %v", got)
	}
}

func TestProblemWhileRedisIsDownAndSharedSecret(t *testing.T) {
	red, a, b := newPair(t)
	ctx := context.Background()
	sa, err := a.PeerSecret(ctx, "")
	if err != nil || len(sa) != 64 {
		t.Fatalf("peer secret: %q %v", sa, err)
	}
	if sb, _ := b.PeerSecret(ctx, ""); sb != sa {
		t.Fatal("replicas got different peer secrets")
	}
	var changes []string
	b.OnChange = func(p string) { changes = append(changes, p) }
	red.Stop()
	if _, err := b.Owners(ctx, "acme"); err == nil || b.Problem() == "" {
		t.Fatalf("Owners with Redis down: err %v, problem %q", err, b.Problem())
	}
	if err := red.Start(); err != nil {
		t.Fatal(err)
	}
	if _, err := b.Owners(ctx, "acme"); err != nil || b.Problem() != "" {
		t.Fatalf("after Redis came back: %v %q", err, b.Problem())
	}
	if len(changes) != 2 || changes[0] == "" || changes[1] != "" {
		t.Fatalf("OnChange calls: %q", changes)
	}
	// Redis came back empty: the secret the replicas use is put back, not
	// replaced, and one starting now gets it too.
	if s, err := a.PeerSecret(ctx, sa); err != nil || s != sa {
		t.Fatalf("after Redis lost its data: %q %v, want the running secret back", s, err)
	}
	if s, _ := b.PeerSecret(ctx, ""); s != sa {
		t.Fatal("a replica starting after the loss got another secret")
	}
	// Another secret in Redis wins over the one a replica brings.
	if s, _ := a.PeerSecret(ctx, "stale"); s != sa {
		t.Fatalf("a replica's stale secret replaced Redis's: %q", s)
	}
}

// Entries expire by Redis's clock: a replica whose clock is a minute
// behind (or ahead) still finds the others' entries, and they its own.
func TestClockSkewBetweenReplicas(t *testing.T) {
	_, a, b := newPair(t)
	ctx := context.Background()
	var logs testrig.LogBuffer
	a.log = slog.New(slog.NewTextHandler(&logs, nil))
	a.clock = func() time.Time { return time.Now().Add(-time.Minute) }
	b.clock = func() time.Time { return time.Now().Add(time.Minute) }
	running(t, a)
	running(t, b)
	a.Hold("behind")
	b.Hold("ahead")
	eventually(t, "each replica sees the other's tunnel", func() bool {
		fromB, err1 := b.Owners(ctx, "behind")
		fromA, err2 := a.Owners(ctx, "ahead")
		return err1 == nil && err2 == nil && slices.Equal(fromB, []string{a.self}) && slices.Equal(fromA, []string{b.self})
	})
	if n, err := a.Replicas(ctx); err != nil || n != 2 {
		t.Fatalf("replicas seen from the one behind: %d %v", n, err)
	}
	if !strings.Contains(logs.String(), "clock differs from redis") {
		t.Errorf("a minute of skew was not logged:\n%s", logs.String())
	}
}

// A Redis that refuses TIME (renamed away on a hardened server) is not
// counted as down: the registry goes by the hosts' clocks, and says so.
func TestRedisWithoutTime(t *testing.T) {
	_, a, b := newPair(t, "--rename-command", "TIME", "")
	var logs testrig.LogBuffer
	a.log = slog.New(slog.NewTextHandler(&logs, nil))
	running(t, a)
	a.Hold("acme")
	ctx := context.Background()
	eventually(t, "the entry seen from the other replica", func() bool {
		got, err := b.Owners(ctx, "acme")
		return err == nil && slices.Equal(got, []string{a.self})
	})
	if a.Problem() != "" || !strings.Contains(logs.String(), "redis refused TIME") {
		t.Fatalf("problem %q; log:\n%s", a.Problem(), logs.String())
	}
}
