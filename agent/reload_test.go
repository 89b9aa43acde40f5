package agent

import (
	"slices"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// A reload that changes a setting the agent reads only at start keeps the
// running value and names it; the rest change.
func TestReloadKeepsRestartOnlySettings(t *testing.T) {
	base := func() *config.Agent {
		return &config.Agent{
			AgentID: "broker-1",
			Relay:   config.RelayClient{URL: "wss://relay.example/v1/connect", Connections: 2},
			Timeouts: config.AgentTimeouts{Dial: 10 * time.Second, TLSHandshake: 10 * time.Second, Upgrade: 10 * time.Second,
				Keepalive: 15 * time.Second, Idle: 5 * time.Minute},
			Log:   config.Log{Level: "info", Format: "json"},
			Audit: config.Audit{Path: "/var/log/ferry/audit.jsonl", MaxSizeMB: 100, MaxFiles: 5},
			// Parsed anew on every reload: a pointer of its own each time.
			Webhooks: config.Webhooks{Listen: ":8181", SpoolDir: "/var/lib/ferry/spool", TLS: &config.TLSFiles{CertFile: "hook.pem", KeyFile: "hook.key"}},
		}
	}
	for _, tc := range []struct {
		name   string
		change func(*config.Agent)
		want   []string
	}{
		{"log level, keepalive and idle change at once", func(c *config.Agent) {
			c.Log.Level = "debug"
			c.Timeouts.Keepalive = 5 * time.Second
			c.Timeouts.Idle = time.Minute
		}, nil},
		{"connections change at once (slots added or retired)", func(c *config.Agent) { c.Relay.Connections = 4 }, nil},
		{"relay url, proxy and the relay connection's timeouts change (connections move to them)", func(c *config.Agent) {
			c.Relay.URL = "wss://elsewhere.example/v1/connect"
			c.Relay.ProxyURL = "http://proxy.example:3128"
			c.Timeouts.Dial = time.Second
			c.Timeouts.TLSHandshake = 2 * time.Second
			c.Timeouts.Upgrade = 3 * time.Second
		}, nil},
		{"log format", func(c *config.Agent) { c.Log.Format = "text" }, []string{"log.format"}},
		{"the audit log's path and rotation change at once", func(c *config.Agent) {
			c.Audit = config.Audit{Path: "/var/log/ferry/elsewhere.jsonl", MaxSizeMB: 10, MaxFiles: 2}
		}, nil},
		{"the audit log turned off", func(c *config.Agent) { c.Audit = config.Audit{} }, []string{"audit (on or off)"}},
		{"the webhook listener's certificate files", func(c *config.Agent) { c.Webhooks.TLS.CertFile = "other.pem" }, []string{"webhooks.listen, spool_dir, lanes and tls"}},
		{"the webhook listener without TLS", func(c *config.Agent) { c.Webhooks.TLS = nil }, []string{"webhooks.listen, spool_dir, lanes and tls"}},
		{"the webhook listener's address", func(c *config.Agent) { c.Webhooks.Listen = ":9191" }, []string{"webhooks.listen, spool_dir, lanes and tls"}},
		{"the webhook secret and limits change at once", func(c *config.Agent) {
			c.Webhooks.SecretFile, c.Webhooks.MaxBodyKB, c.Webhooks.SpoolMaxMB, c.Webhooks.SpoolMaxCount = "/etc/ferry/hook-secret", 64, 10, 100
		}, nil},
		{"webhooks turned off", func(c *config.Agent) { c.Webhooks = config.Webhooks{} }, []string{"webhooks (on or off)"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next := base()
			tc.change(next)
			changed := *next
			got := keepRestartOnly(base(), next)
			if !slices.Equal(got, tc.want) {
				t.Fatalf("kept %q, want %q", got, tc.want)
			}
			// What was kept has its running value; the rest the new one.
			want := base()
			if len(tc.want) == 0 {
				want = &changed
			}
			if next.Relay != want.Relay || next.Timeouts != want.Timeouts || next.Log != want.Log || next.AgentID != want.AgentID || next.Audit != want.Audit ||
				!sameWebhooks(next.Webhooks, want.Webhooks) {
				t.Errorf("after the reload: %+v, want %+v", next, want)
			}
		})
	}
}

// sameWebhooks compares webhook settings by value (TLS is a pointer of
// its own in each parsed config).
func sameWebhooks(a, b config.Webhooks) bool {
	if (a.TLS == nil) != (b.TLS == nil) || a.TLS != nil && *a.TLS != *b.TLS {
		return false
	}
	a.TLS, b.TLS, a.Secret, b.Secret = nil, nil, nil, nil
	return a == b
}

// What makes a reload move the relay connections: each setting the
// dial uses, and a CA file renewed under the same name.
func TestRelaySettingsDiffer(t *testing.T) {
	pkiA, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	pkiB, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	base := func() *config.Agent {
		return &config.Agent{Relay: config.RelayClient{URL: "wss://relay.example/v1/connect", CAFile: "/etc/ferry/ca.pem", CA: pkiA.Pool, Connections: 2},
			Timeouts: config.AgentTimeouts{Dial: 10 * time.Second, TLSHandshake: 10 * time.Second, Upgrade: 10 * time.Second, Keepalive: 15 * time.Second}}
	}
	for _, tc := range []struct {
		name   string
		change func(*config.Agent)
		want   []string
	}{
		{"nothing", func(*config.Agent) {}, nil},
		{"what is not the dial's", func(c *config.Agent) { c.Relay.Connections, c.Timeouts.Keepalive = 3, time.Second }, nil},
		{"the same CA read again", func(c *config.Agent) { c.Relay.CA = pkiA.Pool.Clone() }, nil},
		{"a renewed CA under the same name", func(c *config.Agent) { c.Relay.CA = pkiB.Pool }, []string{"relay.ca_file"}},
		{"system roots instead", func(c *config.Agent) { c.Relay.CAFile, c.Relay.CA = "", nil }, []string{"relay.ca_file"}},
		{"url and proxy", func(c *config.Agent) { c.Relay.URL, c.Relay.ProxyURL = "wss://b.example/v1/connect", "http://p:3128" }, []string{"relay.url", "relay.proxy_url"}},
		{"timeouts", func(c *config.Agent) { c.Timeouts.Dial, c.Timeouts.TLSHandshake, c.Timeouts.Upgrade = 1, 2, 3 },
			[]string{"timeouts.dial", "timeouts.tls_handshake", "timeouts.upgrade"}},
	} {
		next := base()
		tc.change(next)
		if got := relaySettingsDiffer(base(), next); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %q, want %q", tc.name, got, tc.want)
		}
	}
}
