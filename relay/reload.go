package relay

import (
	"context"
	"log/slog"
	"strings"
	"time"

	"github.com/ferry-tunnel/ferry/internal/certfile"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/token"
)

// authTables is everything the relay derives from tunnels: and scanners:,
// replaced whole on reload. Tunnel objects (and their live connections)
// carry over for ids that stay.
type authTables struct {
	tunnels       map[string]*tunnel
	agentHashes   []token.Hash
	agentTunnel   []*tunnel // parallel to agentHashes
	scannerHashes []token.Hash
	scanners      []*scannerAuth // parallel to scannerHashes
	// webhookTargets: tunnel id → webhook_target (absent: none).
	webhookTargets map[string]webhookTarget
	scannerByName  map[string]*scannerAuth // for requests forwarded by a peer replica
	// maxStreams is limits.max_streams_per_tunnel: here, not read from
	// the config the relay started with, so that a reload changes it (an
	// operator whose Bitbucket is swamped lowers it without a restart).
	maxStreams int64
	// maxAgentConns is limits.max_agent_connections_per_tunnel, here for
	// the same reason.
	maxAgentConns int
}

func buildAuth(cfg *config.Relay, prev *authTables) *authTables {
	a := &authTables{tunnels: map[string]*tunnel{}, webhookTargets: map[string]webhookTarget{}, scannerByName: map[string]*scannerAuth{},
		maxStreams: int64(cfg.Limits.MaxStreamsPerTunnel), maxAgentConns: cfg.Limits.MaxAgentConnsPerTunnel}
	for _, tc := range cfg.Tunnels {
		t := (*tunnel)(nil)
		if prev != nil {
			t = prev.tunnels[tc.ID]
		}
		if t == nil {
			t = &tunnel{id: tc.ID}
		}
		a.tunnels[tc.ID] = t
		if tc.WebhookTarget != "" {
			a.webhookTargets[tc.ID] = webhookTarget{url: tc.WebhookTarget, token: tc.WebhookToken}
		}
		for _, h := range tc.AgentHashes {
			a.agentHashes = append(a.agentHashes, h)
			a.agentTunnel = append(a.agentTunnel, t)
		}
	}
	for _, sc := range cfg.Scanners {
		sa := &scannerAuth{name: sc.Name, tunnels: map[string]bool{}, maxStreams: int64(sc.MaxStreams)}
		if prev != nil && prev.scannerByName[sc.Name] != nil {
			// Requests in flight across the reload still count.
			sa.load = prev.scannerByName[sc.Name].load
		} else {
			sa.load = new(scannerLoad)
		}
		for _, t := range sc.Tunnels {
			sa.tunnels[t] = true
		}
		a.scannerHashes = append(a.scannerHashes, sc.Hash)
		a.scanners = append(a.scanners, sa)
		a.scannerByName[sc.Name] = sa
	}
	return a
}

// reloadTimeouts puts next in force: requests and connections that
// start from now on use it. header_read keeps its running value (the
// listeners took it at start; restartOnly names it).
func (r *Relay) reloadTimeouts(next config.RelayTimeouts) {
	cur := r.tmo()
	next.HeaderRead = cur.HeaderRead
	if next == *cur {
		return
	}
	r.timeouts.Store(&next)
	if next.AgentResponse != cur.AgentResponse {
		// Forwarded requests under way keep the transport they started
		// on; it closes its connections as they come back idle.
		r.peer.Swap(r.newPeerProxy(next.AgentResponse)).tr.CloseIdleConnections()
	}
	r.log.Info("timeouts changed; requests and agent connections from now on use them",
		"agent_handshake", next.AgentHandshake.String(), "agent_response", next.AgentResponse.String(), "keepalive", next.Keepalive.String(),
		"idle", next.Idle.String(), "shutdown_grace", next.ShutdownGrace.String())
}

// restartOnly names the settings that differ between the running config
// and next but take effect only on a restart: the relay keeps running
// with the values it started with, and says so rather than log "config
// reloaded" over a change that did not happen.
func restartOnly(old, next *config.Relay) []string {
	var kept []string
	if next.AgentListen != old.AgentListen || next.ScannerListen != old.ScannerListen || next.AdminListen != old.AdminListen {
		kept = append(kept, "listen addresses")
	}
	if next.AdminPprof != old.AdminPprof {
		kept = append(kept, "admin_pprof")
	}
	// The certificate files are re-read on reload; which files, and
	// whether there is TLS at all, is fixed at start.
	sameFiles := func(a, b *config.TLSFiles) bool { return a == nil && b == nil || a != nil && b != nil && *a == *b }
	if !sameFiles(next.TLS, old.TLS) || !sameFiles(next.ScannerTLS, old.ScannerTLS) || next.InsecurePlaintext != old.InsecurePlaintext {
		kept = append(kept, "tls on/off and certificate file names")
	}
	nreg, oreg := next.Registry, old.Registry
	nreg.PeerSecret, oreg.PeerSecret = nil, nil
	if nreg != oreg {
		kept = append(kept, "registry")
	}
	if next.Timeouts.HeaderRead != old.Timeouts.HeaderRead {
		kept = append(kept, "timeouts.header_read")
	}
	if next.Log.Format != old.Log.Format {
		kept = append(kept, "log.format")
	}
	return kept
}

// certSource is a listener's certificate, which Reload, or the relay
// noticing renewed files (watchCerts), can replace.
type certSource struct {
	listener string // agent or scanner
	*certfile.Source
}

func newCertSource(listener string, files *config.TLSFiles) (*certSource, error) {
	src, err := certfile.Load(files.CertFile, files.KeyFile)
	if err != nil {
		return nil, err
	}
	return &certSource{listener: listener, Source: src}, nil
}

// refreshCert loads cs's files again, logging and counting what changed.
// why says what asked (reload, files changed).
func (r *Relay) refreshCert(cs *certSource, why string) {
	// A lasting error is logged once (Check): files being renewed may be
	// read between the certificate and the key, and the next look finds
	// them whole.
	renewed, err := cs.Check()
	switch {
	case err != nil:
		r.log.Error("TLS certificate files do not load; still serving the current certificate", "listener", cs.listener, "why", why, "err", err)
	case renewed:
		r.noteCert(cs, "TLS certificate renewed; new connections get it", why)
	}
}

// noteCert logs the certificate cs serves and sets its expiry metric.
func (r *Relay) noteCert(cs *certSource, msg, why string) {
	na := cs.NotAfter()
	r.metrics.CertExpiry.WithLabelValues(cs.listener).Set(float64(na.Unix()))
	level, advice := certfile.Urgency(na)
	if advice != "" {
		msg += "; " + advice
	}
	r.log.Log(context.Background(), level, msg, "listener", cs.listener, "why", why, "file", cs.CertFile, "not_after", na.UTC().Format(time.RFC3339))
}

// watchCerts loads certificate files again whenever they change, until
// ctx ends.
func (r *Relay) watchCerts(ctx context.Context, every time.Duration) {
	certfile.Watch(ctx, every, func() {
		for _, cs := range r.certSources() {
			r.refreshCert(cs, "files changed")
		}
	})
}

func (r *Relay) certSources() []*certSource {
	var out []*certSource
	for _, cs := range []*certSource{r.agentCert, r.scannerCert} {
		if cs != nil {
			out = append(out, cs)
		}
	}
	return out
}

// Reload re-reads the config file (SIGHUP): tunnels, agent tokens,
// scanners, limits, timeouts (but header_read), the log level and the TLS
// certificates change at once.
// Connections whose token is no longer listed for their tunnel, or whose
// tunnel is gone, are told to go away. A file that fails validation
// leaves everything as it was. The rest (restartOnly) needs a restart and
// keeps its running value, with a warning naming it.
func (r *Relay) Reload() error {
	r.reloadMu.Lock()
	defer r.reloadMu.Unlock()
	next, err := config.LoadRelay(r.cfg.File)
	if err != nil {
		r.metrics.Reloads.Failed()
		r.loads.Failed(err)
		r.log.Error("config reload failed; the running config stays in force", "err", err)
		return err
	}
	for _, cs := range r.certSources() {
		r.refreshCert(cs, "reload")
	}
	kept := restartOnly(r.cfg, next)
	if len(kept) > 0 {
		r.log.Warn("config reload: these settings change only on restart; keeping the running values", "fields", strings.Join(kept, ", "))
	}
	prev := r.auth.Load()
	cur := buildAuth(next, prev)
	r.auth.Store(cur)
	r.reloadTimeouts(next.Timeouts)
	if r.level != nil {
		var l slog.Level
		l.UnmarshalText([]byte(next.Log.Level))
		r.level.Set(l)
	}
	// Cut what the new config no longer allows.
	allowed := map[*tunnel]map[token.Hash]bool{}
	for i, h := range cur.agentHashes {
		t := cur.agentTunnel[i]
		if allowed[t] == nil {
			allowed[t] = map[token.Hash]bool{}
		}
		allowed[t][h] = true
	}
	for id, t := range prev.tunnels {
		for _, c := range t.snapshot() {
			switch {
			case cur.tunnels[id] == nil:
				r.log.Info("tunnel removed from config; closing its agent connection", "tunnel", id, "connection_id", c.id)
				c.goAway("tunnel removed from the relay's config")
				c.sess.Close()
			case !allowed[t][c.tokenHash]:
				r.log.Info("agent token removed from config; closing the connection that used it", "tunnel", id, "connection_id", c.id)
				c.goAway("agent token revoked")
				c.sess.Close()
			}
		}
	}
	for id := range prev.tunnels {
		if cur.tunnels[id] == nil {
			// Its gauges would otherwise stay at their last value, and an
			// alert on a tunnel without agents would fire for good.
			r.metrics.ForgetTunnel(id)
		}
	}
	for name := range prev.scannerByName {
		if cur.scannerByName[name] == nil {
			r.metrics.ForgetScanner(name)
		}
	}
	for id := range cur.tunnels {
		r.metrics.AgentConnections.WithLabelValues(id).Add(0)
		r.metrics.StreamsInFlight.WithLabelValues(id).Add(0)
	}
	r.metrics.Reloads.Succeeded()
	r.loads.Succeeded()
	r.log.Info("config reloaded", "file", next.File, "tunnels", len(cur.tunnels), "scanners", len(cur.scanners))
	return nil
}
