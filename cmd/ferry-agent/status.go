package main

import (
	"fmt"
	"io"
	"time"

	"github.com/ferry-tunnel/ferry/agent"
	"github.com/ferry-tunnel/ferry/internal/certfile"
	"github.com/ferry-tunnel/ferry/internal/cli"
)

// status reads the running agent's /v1/status and prints it for people.
func status(args []string, stdout, stderr io.Writer) error {
	var s agent.Status
	if done, err := cli.ReadStatus(args, stdout, stderr, "ferry-agent", "diagnostics.listen", "127.0.0.1:9091", "/v1/status", &s); done || err != nil {
		return err
	}
	state := "CONNECTED"
	if s.Connected == 0 {
		state = "DISCONNECTED"
	}
	finishing := ""
	if s.Finishing > 0 {
		finishing = fmt.Sprintf(" (and %d finishing their requests before closing)", s.Finishing)
	}
	fmt.Fprintf(stdout, "ferry-agent %s (%s): %s, %d of %d relay connections up%s\n", s.AgentID, s.Version, state, s.Connected, len(s.Connections), finishing)
	fmt.Fprintf(stdout, "relay:     %s\n", s.Relay)
	if c := s.Config; c.LastError != "" {
		fmt.Fprintf(stdout, "config:    %s, loaded %s; LAST RELOAD REFUSED %s: %s (the loaded config stays in force)\n",
			c.File, c.LoadedAt.Format(time.RFC3339), c.LastErrorAt.Format(time.RFC3339), c.LastError)
	} else if c.File != "" {
		fmt.Fprintf(stdout, "config:    %s, loaded %s\n", c.File, c.LoadedAt.Format(time.RFC3339))
	}
	fmt.Fprintf(stdout, "uptime:    %s\n", (time.Duration(s.UptimeSec) * time.Second).String())
	fmt.Fprintf(stdout, "upstreams: %v\n", s.Upstreams)
	for _, l := range s.Load {
		line := fmt.Sprintf("  %s: %d in flight", l.Upstream, l.InFlight)
		if l.Limit > 0 {
			line += fmt.Sprintf(" (max_concurrent_requests %d)", l.Limit)
		}
		if l.Waiting > 0 {
			line += fmt.Sprintf(", %d waiting", l.Waiting)
		}
		if l.Refused > 0 {
			line += fmt.Sprintf(", %d refused busy since start", l.Refused)
		}
		fmt.Fprintln(stdout, line)
	}
	fmt.Fprintf(stdout, "requests:  %d (%d allowed, %d denied)\n", s.Requests.Total, s.Requests.Allowed, s.Requests.Denied)
	if s.Requests.LastDenial != "" {
		fmt.Fprintf(stdout, "last denial: %s at %s\n", s.Requests.LastDenial, s.Requests.LastDeniedAt.Format(time.RFC3339))
	}
	for _, c := range s.Connections {
		line := fmt.Sprintf("  connection %d: ", c.Slot)
		if c.Connected {
			line += fmt.Sprintf("up since %s (relay %s)", c.Since.Format(time.RFC3339), c.RelayID)
			if !c.RelayCertNotAfter.IsZero() {
				line += fmt.Sprintf(", relay certificate valid until %s (%d days left)", c.RelayCertNotAfter.Format(time.DateOnly), certfile.DaysLeft(c.RelayCertNotAfter))
			}
		} else {
			line += "down"
		}
		if c.Reconnects > 0 {
			line += fmt.Sprintf(", %d reconnects", c.Reconnects)
		}
		if c.LastError != "" {
			line += fmt.Sprintf("; last error %s: %s", c.LastErrorAt.Format(time.RFC3339), c.LastError)
		}
		fmt.Fprintln(stdout, line)
	}
	if au := s.Audit; au != nil {
		line := fmt.Sprintf("audit:     %s: %d decisions recorded since start", au.Path, au.Written)
		if au.Lost > 0 {
			line += fmt.Sprintf(", %d LOST", au.Lost)
		}
		fmt.Fprintln(stdout, line)
		if au.LastError != "" {
			fmt.Fprintf(stdout, "  last error %s: %s\n", au.LastErrorAt.Format(time.RFC3339), au.LastError)
		}
	}
	if wh := s.Webhooks; wh != nil {
		sig := "signature required"
		if !wh.Signed {
			sig = "unsigned accepted"
		}
		scheme := "http"
		if wh.TLS != nil {
			scheme = "https"
		}
		fmt.Fprintf(stdout, "webhooks:  listening on %s://%s (%s); %d accepted, %d delivered since start\n", scheme, wh.Listen, sig, wh.Accepted, wh.Forwarded)
		if c := wh.TLS; c != nil {
			line := fmt.Sprintf("  TLS certificate valid until %s (%d days left)", c.NotAfter.Format(time.RFC3339), certfile.DaysLeft(c.NotAfter))
			if c.Problem != "" {
				line += "; RENEWED FILES DO NOT LOAD: " + c.Problem
			}
			fmt.Fprintln(stdout, line)
		}
		line := fmt.Sprintf("  spool %s: %d waiting (%d bytes)", wh.Spool.Dir, wh.Spool.Spooled, wh.Spool.Bytes)
		if wh.Spool.Spooled > 0 {
			line += fmt.Sprintf(", oldest %s old", (time.Duration(wh.OldestAgeS) * time.Second).String())
		}
		if wh.Spool.Quarantined > 0 {
			line += fmt.Sprintf(", %d QUARANTINED (corrupt; see %s/quarantine)", wh.Spool.Quarantined, wh.Spool.Dir)
		}
		fmt.Fprintln(stdout, line)
		if wh.LastError != "" {
			fmt.Fprintf(stdout, "  last error %s: %s\n", wh.LastErrorAt.Format(time.RFC3339), wh.LastError)
		}
	}
	return nil
}
