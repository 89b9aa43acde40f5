package relay

import (
	"slices"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/config"
)

// A reload that changes a setting the relay reads only at start must say
// the setting was kept, not log "config reloaded" as if it took effect.
func TestReloadNamesSettingsKeptUntilRestart(t *testing.T) {
	base := func() *config.Relay {
		return &config.Relay{
			AgentListen: ":443", ScannerListen: ":8080", AdminListen: ":9090",
			TLS:      &config.TLSFiles{CertFile: "relay.crt", KeyFile: "relay.key"},
			Registry: config.Registry{Backend: "memory"},
			Timeouts: config.RelayTimeouts{AgentResponse: 150 * time.Second, Idle: 5 * time.Minute},
			Limits:   config.Limits{MaxStreamsPerTunnel: 1024},
			Log:      config.Log{Level: "info", Format: "json"},
			Tunnels:  []config.Tunnel{{ID: "acme"}},
		}
	}
	for _, tc := range []struct {
		name   string
		change func(*config.Relay)
		want   []string
	}{
		{"tunnels, scanners and log level apply at once", func(c *config.Relay) {
			c.Tunnels = append(c.Tunnels, config.Tunnel{ID: "globex"})
			c.Scanners = []config.Scanner{{Name: "s", Tunnels: []string{"acme"}}}
			c.Log.Level = "debug"
		}, nil},
		{"same certificate files, re-read", func(c *config.Relay) { c.TLS = &config.TLSFiles{CertFile: "relay.crt", KeyFile: "relay.key"} }, nil},
		{"limits apply at once", func(c *config.Relay) { c.Limits.MaxStreamsPerTunnel = 10 }, nil},
		{"timeouts change at once", func(c *config.Relay) { c.Timeouts.Idle = time.Minute }, nil},
		{"but header_read, which the listeners took at start", func(c *config.Relay) { c.Timeouts.HeaderRead = time.Minute }, []string{"timeouts.header_read"}},
		{"log format", func(c *config.Relay) { c.Log.Format = "text" }, []string{"log.format"}},
		{"certificate file names", func(c *config.Relay) { c.TLS = &config.TLSFiles{CertFile: "new.crt", KeyFile: "relay.key"} }, []string{"tls on/off and certificate file names"}},
		{"scanner TLS turned on", func(c *config.Relay) { c.ScannerTLS = &config.TLSFiles{CertFile: "s.crt", KeyFile: "s.key"} }, []string{"tls on/off and certificate file names"}},
		{"listen address and registry", func(c *config.Relay) {
			c.AdminListen = ":9091"
			c.Registry.Backend = "redis"
		}, []string{"listen addresses", "registry"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			next := base()
			tc.change(next)
			if got := restartOnly(base(), next); !slices.Equal(got, tc.want) {
				t.Errorf("kept %q, want %q", got, tc.want)
			}
		})
	}
}
