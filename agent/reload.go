package agent

import (
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/proto"
)

// Reload re-reads the config file (SIGHUP). A file that fails validation
// leaves the running config in force, with the error logged and returned.
// Upstreams, policies, credentials, the relay token and the log level
// change at once. New relay settings (url, ca_file and its contents,
// proxy, the connection's timeouts) are tried on a live connection
// first, and a reload whose settings cannot connect is refused whole;
// then the other connections move too, each serving until its
// successor is up. relay.connections adds connections, or retires the
// last ones, which finish their streams first. The audit log moves to a
// new path, or rotates by new bounds; the webhook secret and limits
// change. Settings that need a restart (keepRestartOnly: diagnostics,
// the audit log on or off, the webhook listener, spool and lanes, log
// format, agent_id) keep their running values, with a warning naming them.
func (a *Agent) Reload() error {
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	daemon.SdNotify(false, daemon.SdNotifyReloading)
	defer daemon.SdNotify(false, daemon.SdNotifyReady)
	// A reload reopens the audit log whatever the config says: after the
	// file was moved or deleted from outside, lines go to a new file at
	// its path.
	if err := a.audit.Reopen(); err != nil {
		a.log.Error("audit log could not be reopened; retried at the next decision", "err", err)
	}
	if a.webhooks != nil {
		a.webhooks.checkCert("reload")
	}
	old := a.config()
	next, err := config.LoadAgent(old.File)
	if err == nil {
		err = a.apply(old, next)
	}
	if err != nil {
		a.metrics.Reloads.Failed()
		a.loads.Failed(err)
		a.log.Error("config reload failed; the running config stays in force", "err", err)
		return err
	}
	a.metrics.Reloads.Succeeded()
	a.loads.Succeeded()
	a.log.Info("config reloaded", "file", next.File, "upstreams", a.upstreams().names)
	return nil
}

// apply puts next in force in place of old, or, when it returns an
// error, nothing of it.
func (a *Agent) apply(old, next *config.Agent) error {
	// Restart-only values are put back first, so that what is built from
	// next (the upstreams' transports) uses the running ones too.
	kept := keepRestartOnly(old, next)
	ups, err := newUpstreamSet(next, a.log, a.pool, &a.gates)
	if err != nil {
		return err
	}
	// The audit log moves before the relay connections do: a path that
	// cannot be opened refuses the reload while nothing has changed.
	auditMoved := next.Audit != old.Audit && next.Audit.Path != ""
	if auditMoved {
		if err := a.audit.Reconfigure(auditOptions(next)); err != nil {
			return fmt.Errorf("audit.path %s: %w", next.Audit.Path, err)
		}
	}
	if changed := relaySettingsDiffer(old, next); len(changed) > 0 {
		if err := a.moveRelay(next, changed); err != nil {
			if auditMoved {
				if rerr := a.audit.Reconfigure(auditOptions(old)); rerr != nil {
					a.log.Error("audit log could not go back to its path after the refused reload; lines go to the new one", "path", next.Audit.Path, "err", rerr)
				}
			}
			return err
		}
	}
	if len(kept) > 0 {
		a.log.Warn("config reload: these settings change only on restart; keeping the running values", "fields", strings.Join(kept, ", "))
	}
	prev := a.ups.Swap(ups)
	ups.applyLimits()
	a.cfg.Store(next)
	if a.webhooks != nil {
		a.webhooks.reload(next.Webhooks)
	}
	if a.level != nil {
		var l slog.Level
		l.UnmarshalText([]byte(next.Log.Level))
		a.level.Set(l)
	}
	// Requests in flight keep the transport they started with; only its
	// idle connections go.
	prev.closeIdle()
	if !slices.Equal(prev.names, ups.names) {
		a.announceUpstreams(ups.names)
		var gone []string
		for _, name := range prev.names {
			if ups.byName[name] == nil {
				gone = append(gone, name)
			}
		}
		a.forgetCredentials(gone)
	}
	select {
	case a.recheck <- struct{}{}:
	default:
	}
	if n := next.Relay.Connections; n != old.Relay.Connections {
		a.slots.resize(n)
		if n > old.Relay.Connections {
			a.log.Info("relay.connections raised; the new connections dial now", "from", old.Relay.Connections, "to", n)
		} else {
			a.log.Info("relay.connections lowered; the connections past it finish their streams and close", "from", old.Relay.Connections, "to", n)
		}
	}
	return nil
}

// keepRestartOnly copies into next the running values of settings that
// cannot change without a restart, and names those that differed.
func keepRestartOnly(old, next *config.Agent) []string {
	var kept []string
	keep := func(name string, differ bool, restore func()) {
		if differ {
			kept = append(kept, name)
			restore()
		}
	}
	keep("agent_id", old.AgentID != next.AgentID, func() { next.AgentID = old.AgentID })
	keep("diagnostics.listen", old.Diagnostics != next.Diagnostics, func() { next.Diagnostics = old.Diagnostics })
	keep("audit (on or off)", (old.Audit.Path == "") != (next.Audit.Path == ""), func() { next.Audit = old.Audit })
	// The webhook listener, its spool and lanes stay as they started; its
	// secret and limits change (webhooks.reload). The certificate files
	// are compared by name: their contents are re-read on reload, and
	// when they change.
	ow, nw := old.Webhooks, next.Webhooks
	if ow.Enabled() != nw.Enabled() {
		keep("webhooks (on or off)", true, func() { next.Webhooks = old.Webhooks })
	} else {
		sameTLS := (ow.TLS == nil) == (nw.TLS == nil) && (ow.TLS == nil || *ow.TLS == *nw.TLS)
		keep("webhooks.listen, spool_dir, lanes and tls", ow.Listen != nw.Listen || ow.SpoolDir != nw.SpoolDir || ow.Lanes != nw.Lanes || !sameTLS,
			func() {
				next.Webhooks.Listen, next.Webhooks.SpoolDir, next.Webhooks.Lanes, next.Webhooks.TLS = ow.Listen, ow.SpoolDir, ow.Lanes, ow.TLS
			})
	}
	keep("log.format", old.Log.Format != next.Log.Format, func() { next.Log.Format = old.Log.Format })
	return kept
}

// announceUpstreams tells the relay, on every live connection, which
// upstreams this agent now serves.
func (a *Agent) announceUpstreams(names []string) {
	for _, c := range a.slots.all() {
		c.send(proto.Message{Type: proto.MsgUpstreams, Upstreams: names})
	}
}

// send writes a control message on the slot's live connection, if any.
func (c *connState) send(m proto.Message) {
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	if c.ctrl == nil {
		return
	}
	c.ctrl.SetWriteDeadline(time.Now().Add(5 * time.Second))
	proto.WriteMessage(c.ctrl, m)
	c.ctrl.SetWriteDeadline(time.Time{})
}
