package main

import (
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/ferry-tunnel/ferry/internal/cli"
	"github.com/ferry-tunnel/ferry/relay"
)

// status reads the running relay's /v1/status and prints it for people:
// in a distroless container there is no curl, but there is this binary.
func status(args []string, stdout, stderr io.Writer) error {
	var s relay.Status
	if done, err := cli.ReadStatus(args, stdout, stderr, "ferry-relay", "admin_listen", "127.0.0.1:9090", "/v1/status", &s); done || err != nil {
		return err
	}
	online := 0
	for _, t := range s.Tunnels {
		if t.Online {
			online++
		}
	}
	fmt.Fprintf(stdout, "ferry-relay %s (%s): %d of %d tunnels online, up %s\n", s.RelayID, s.Version, online, len(s.Tunnels),
		time.Since(s.Started).Round(time.Second))
	reg := "registry:  " + s.Registry
	if s.Advertise != "" {
		reg += ", this replica at " + s.Advertise
	}
	if s.RegistryProblem != "" {
		reg += "; DEGRADED: " + s.RegistryProblem
	}
	fmt.Fprintln(stdout, reg)
	if c := s.Config; c.LastError != "" {
		fmt.Fprintf(stdout, "config:    %s, loaded %s; LAST RELOAD REFUSED %s: %s (the loaded config stays in force)\n",
			c.File, c.LoadedAt.Format(time.RFC3339), c.LastErrorAt.Format(time.RFC3339), c.LastError)
	} else if c.File != "" {
		fmt.Fprintf(stdout, "config:    %s, loaded %s\n", c.File, c.LoadedAt.Format(time.RFC3339))
	}
	for _, c := range s.Certs {
		line := fmt.Sprintf("certificate (%s listener): valid until %s (%d days left)", c.Listener, c.NotAfter.Format(time.DateOnly), c.DaysLeft)
		if c.Soon {
			line += "; RENEW IT"
		}
		if c.Problem != "" {
			line += "; RENEWED FILES DO NOT LOAD: " + c.Problem
		}
		fmt.Fprintln(stdout, line)
	}
	fmt.Fprintf(stdout, "requests:  %d (%d refused, %d failed)\n", s.Requests, s.Refused, s.Failed)
	fmt.Fprintln(stdout, "tunnels:")
	for _, t := range s.Tunnels {
		if !t.Online {
			fmt.Fprintf(stdout, "  %s: OFFLINE, no agent connected (scanners get 503 tunnel_offline)\n", t.ID)
			continue
		}
		fmt.Fprintf(stdout, "  %s: online, %d agent connections\n", t.ID, len(t.Connections))
		for _, c := range t.Connections {
			line := fmt.Sprintf("    %s (%s) from %s, up %s, upstreams %s: %d in flight, %d served", c.AgentID, c.Version, c.Remote,
				time.Since(c.ConnectedAt).Round(time.Second), strings.Join(c.Upstreams, ","), c.InFlight, c.Served)
			if c.Draining {
				line += ", draining (takes no new requests)"
			}
			fmt.Fprintln(stdout, line)
		}
	}
	fmt.Fprintln(stdout, "scanners:")
	for _, sc := range s.Scanners {
		line := fmt.Sprintf("  %s (tunnels %s): %d in flight", sc.Name, strings.Join(sc.Tunnels, ","), sc.InFlight)
		if sc.MaxStreams > 0 {
			line += fmt.Sprintf(" of max_streams %d", sc.MaxStreams)
		}
		if sc.OverLimit > 0 {
			line += fmt.Sprintf(", %d refused over it since start", sc.OverLimit)
		}
		fmt.Fprintln(stdout, line)
	}
	if len(s.Recent) > 0 {
		fmt.Fprintln(stdout, "recent errors (newest first):")
		for _, e := range s.Recent {
			fmt.Fprintf(stdout, "  %s %d %s tunnel %s scanner %s: %s %s (request %s)\n", e.Time.Format(time.RFC3339), e.Status, e.Code,
				e.Tunnel, e.Scanner, e.Method, e.Path, e.RequestID)
		}
	}
	return nil
}
