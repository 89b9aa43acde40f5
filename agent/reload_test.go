package agent

import (
	"slices"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/config"
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
			Log: config.Log{Level: "info", Format: "json"},
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
		{"relay url and connections", func(c *config.Agent) {
			c.Relay.URL = "wss://elsewhere.example/v1/connect"
			c.Relay.Connections = 4
		}, []string{"relay.url", "relay.connections"}},
		{"the relay connection's timeouts", func(c *config.Agent) {
			c.Timeouts.Dial = time.Second
			c.Timeouts.TLSHandshake = 2 * time.Second
			c.Timeouts.Upgrade = 3 * time.Second
		}, []string{"timeouts.dial", "timeouts.tls_handshake", "timeouts.upgrade"}},
		{"log format", func(c *config.Agent) { c.Log.Format = "text" }, []string{"log.format"}},
		{"the webhook listener's certificate files", func(c *config.Agent) { c.Webhooks.TLS.CertFile = "other.pem" }, []string{"webhooks"}},
		{"the webhook listener without TLS", func(c *config.Agent) { c.Webhooks.TLS = nil }, []string{"webhooks"}},
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
			if next.Relay != want.Relay || next.Timeouts != want.Timeouts || next.Log != want.Log || next.AgentID != want.AgentID {
				t.Errorf("after the reload: %+v, want %+v", next, want)
			}
		})
	}
}
