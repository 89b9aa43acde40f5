package main

import (
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/ferry-tunnel/ferry/internal/certfile"
	"github.com/ferry-tunnel/ferry/internal/cli"
	"github.com/ferry-tunnel/ferry/internal/config"
)

// check validates a relay config the way the relay would at start, and
// says what it holds: for a CI step or before a rollout (like nginx -t).
// A bad config is the same one-line error, exit 2; a certificate that has
// expired fails too (exit 1).
func check(args []string, stdout, stderr io.Writer) error {
	path, err := cli.ConfigFlag("ferry-relay check", args, stderr)
	if err != nil {
		return err
	}
	cfg, err := config.LoadRelay(path)
	if err != nil {
		return err
	}
	scheme := "wss"
	if cfg.TLS == nil {
		scheme = "ws (insecure_plaintext)"
	}
	fmt.Fprintf(stdout, "%s: ok\n", path)
	fmt.Fprintf(stdout, "  agents:   %s on %s\n", scheme, cfg.AgentListen)
	fmt.Fprintf(stdout, "  scanners: %s; admin %s\n", cfg.ScannerListen, cfg.AdminListen)
	fmt.Fprintf(stdout, "  %d tunnels, %d scanners; registry %s\n", len(cfg.Tunnels), len(cfg.Scanners), cfg.Registry.Backend)
	var expired error
	for _, c := range []struct {
		name  string
		files *config.TLSFiles
	}{{"agent", cfg.TLS}, {"scanner", cfg.ScannerTLS}} {
		if c.files == nil {
			continue
		}
		src, err := certfile.Load(c.files.CertFile, c.files.KeyFile)
		if err != nil {
			return err
		}
		na := src.NotAfter()
		level, advice := certfile.Urgency(na)
		note := ""
		if advice != "" {
			note = "; " + advice
		}
		if level >= slog.LevelError {
			expired = fmt.Errorf("%s: the %s certificate %s expired on %s", path, c.name, c.files.CertFile, na.Format(time.DateOnly))
		}
		fmt.Fprintf(stdout, "  %s certificate %s valid until %s, %d days left%s\n", c.name, c.files.CertFile, na.Format(time.DateOnly), certfile.DaysLeft(na), note)
	}
	return expired
}
