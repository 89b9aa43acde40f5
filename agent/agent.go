// Package agent is ferry-agent: it keeps WSS connections to the relay and
// serves the requests arriving over them by calling internal upstreams,
// only as far as each upstream's policy allows.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/audit"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/statuspage"
	"github.com/ferry-tunnel/ferry/internal/version"
	"github.com/ferry-tunnel/ferry/proto"
)

// Agent is one agent process. Create with New, bind with Listen, run with
// Serve (or all with Run).
type Agent struct {
	cfg       atomic.Pointer[config.Agent] // swapped whole by Reload
	log       *slog.Logger
	level     *slog.LevelVar // nil: level not reloadable
	ups       atomic.Pointer[upstreamSet]
	gates     gates // per upstream name, across reloads
	pool      *httpx.BufferPool
	reloadMu  sync.Mutex
	loads     *config.Loads               // for status: when the config was loaded, a refused reload
	relay     atomic.Pointer[relayDialer] // how connections reach the relay; a reload may move them
	streams   *streamListener
	audit     *audit.Log
	slots     *slotSet
	stats     stats
	metrics   *metrics.Agent
	recheck   chan struct{}  // asks watchCredentials to check now
	draining  atomic.Bool    // set at shutdown: no new connections, no new streams
	inflight  atomic.Int64   // requests being served
	bg        sync.WaitGroup // sessions draining after a goaway, a move or a retire
	finishing atomic.Int64   // those sessions, for status
	denials   *statuspage.Recent[audit.Entry]
	page      *statuspage.Page

	webhooks *webhooks     // nil: webhooks.listen unset
	nextSlot atomic.Uint32 // round robin over connections for agent-opened streams

	credMu  sync.Mutex
	creds   map[string]CredentialReport // by upstream, from the last check
	diagLn  net.Listener
	started time.Time
}

// New builds an agent from a validated config.
func New(cfg *config.Agent, log *slog.Logger) (*Agent, error) {
	a := &Agent{log: log, pool: httpx.NewBufferPool(32 << 10), streams: newStreamListener(), started: time.Now(), metrics: metrics.NewAgent(), creds: map[string]CredentialReport{}, recheck: make(chan struct{}, 1),
		denials: statuspage.NewRecent[audit.Entry](25), page: statuspage.New("ferry agent", "/v1/status", agentPage)}
	a.cfg.Store(cfg)
	a.loads = config.NewLoads(cfg.File)
	a.gates.metrics = a.metrics
	ups, err := newUpstreamSet(cfg, log, a.pool, &a.gates)
	if err != nil {
		return nil, err
	}
	ups.applyLimits()
	a.ups.Store(ups)
	d, err := newRelayDialer(cfg)
	if err != nil {
		return nil, err
	}
	a.relay.Store(d)
	a.slots = newSlotSet(cfg.Relay.Connections)
	return a, nil
}

// config is the configuration in force.
func (a *Agent) config() *config.Agent { return a.cfg.Load() }

// upstreams is the upstream set in force.
func (a *Agent) upstreams() *upstreamSet { return a.ups.Load() }

// SetLevelVar lets Reload change the log level the logger was built with.
func (a *Agent) SetLevelVar(v *slog.LevelVar) { a.level = v }

// Listen binds the diagnostics listener and opens the audit log.
func (a *Agent) Listen() error {
	cfg := a.config()
	ln, err := net.Listen("tcp", cfg.Diagnostics.Listen)
	if err != nil {
		return fmt.Errorf("diagnostics.listen %s: %w", cfg.Diagnostics.Listen, err)
	}
	al, err := audit.Open(auditOptions(cfg))
	if err != nil {
		ln.Close()
		return err
	}
	if cfg.Webhooks.Enabled() {
		wh, err := openWebhooks(cfg.Webhooks, a.log, a.metrics)
		if err != nil {
			ln.Close()
			al.Close()
			return err
		}
		a.webhooks = wh
	}
	a.diagLn, a.audit = ln, al
	return nil
}

// auditOptions is where cfg sends audit lines, and how they rotate.
func auditOptions(cfg *config.Agent) audit.Options {
	return audit.Options{Path: cfg.Audit.Path, MaxBytes: int64(cfg.Audit.MaxSizeMB) << 20, Keep: cfg.Audit.MaxFiles}
}

// WebhookAddr is the bound webhook listener address ("" when off).
func (a *Agent) WebhookAddr() string {
	if a.webhooks == nil {
		return ""
	}
	return a.webhooks.Addr()
}

// DiagAddr is the bound diagnostics address.
func (a *Agent) DiagAddr() string { return a.diagLn.Addr().String() }

// Run binds and serves until ctx is done.
func Run(ctx context.Context, cfg *config.Agent, log *slog.Logger) error {
	a, err := New(cfg, log)
	if err != nil {
		return err
	}
	if err := a.Listen(); err != nil {
		return err
	}
	return a.Serve(ctx)
}

// Serve keeps the relay connections up and serves requests until ctx is
// done; then it stops taking requests, lets those in flight finish (up to
// timeouts.drain), closes the connections and waits for every goroutine.
func (a *Agent) Serve(ctx context.Context) error {
	defer a.audit.Close()
	tunnelSrv := &http.Server{
		Handler:     a,
		ConnContext: connContext,
		// Keep-alive streams wait for their next request with no deadline:
		// the relay closes those it no longer needs (relay/pool.go).
		ReadHeaderTimeout: 30 * time.Second,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          logging.ServerErrorLog(a.log),
	}
	diagSrv := &http.Server{Handler: a.diagHandler(), ReadHeaderTimeout: 5 * time.Second, MaxHeaderBytes: 16 << 10, ErrorLog: logging.ServerErrorLog(a.log)}
	errc := make(chan error, 2)
	go func() { errc <- tunnelSrv.Serve(a.streams) }()
	go func() { errc <- diagSrv.Serve(a.diagLn) }()

	// Connections get their own context: on shutdown they stay up while
	// requests in flight drain, and are cut after.
	connCtx, stopConns := context.WithCancel(context.Background())
	defer stopConns()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		a.watchCredentials(connCtx)
	}()
	notifyCtx, stopNotify := context.WithCancel(context.Background())
	defer stopNotify()
	go func() {
		defer wg.Done()
		a.notifySystemd(notifyCtx)
	}()
	a.slots.start(func(st *connState) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.keepConnected(connCtx, st)
		}()
	})
	// Webhook forwarding stops before the connections close: a delivery
	// cut mid-send stays spooled and goes out after the restart.
	whCtx, stopWebhooks := context.WithCancel(context.Background())
	defer stopWebhooks()
	if a.webhooks != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			a.webhooks.serve(whCtx, a)
		}()
	}
	a.log.Info("agent started", "version", version.Version, "agent_id", a.config().AgentID, "relay", a.config().Relay.URL,
		"connections", len(a.slots.all()), "upstreams", a.upstreams().names, "diagnostics", a.DiagAddr())

	var runErr error
	pending := 2 // Serve results still to collect
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		pending--
		runErr = fmt.Errorf("listener failed: %w", runErr)
	}
	stopNotify() // STOPPING=1 before the drain
	a.drain()
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := tunnelSrv.Shutdown(sctx); err != nil {
		tunnelSrv.Close()
	}
	stopWebhooks()
	stopConns()
	a.slots.stop()
	wg.Wait()
	a.bg.Wait()
	diagSrv.Close()
	a.CloseIdleConnections()
	a.relay.Load().client.CloseIdleConnections()
	for ; pending > 0; pending-- {
		if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) && runErr == nil {
			runErr = err
		}
	}
	a.log.Info("agent stopped")
	return runErr
}

func (a *Agent) drainTimeout() time.Duration { return a.config().Timeouts.Drain }

// drain stops new work and waits for requests in flight: it tells the
// relay on every connection to send no more streams, waits for the acks
// (so nothing is on its way), then for the requests to finish, up to the
// drain timeout.
func (a *Agent) drain() {
	a.draining.Store(true)
	timeout := a.drainTimeout()
	a.log.Info("agent draining: no new requests; waiting for those in flight", "in_flight", a.inflight.Load(), "timeout", timeout.String())
	deadline := time.Now().Add(timeout)
	var acks []chan struct{}
	for _, c := range a.slots.all() {
		if ch := c.startDrain(); ch != nil {
			acks = append(acks, ch)
		}
	}
	ackWait := time.NewTimer(2 * time.Second)
	defer ackWait.Stop()
acks:
	for _, ch := range acks {
		select {
		case <-ch:
		case <-ackWait.C:
			a.log.Warn("relay did not acknowledge draining in 2s; continuing")
			break acks
		}
	}
	done := func() bool { return a.inflight.Load() == 0 && a.settled() }
	for !done() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if !done() {
		a.log.Warn("drain timeout: cutting requests still in flight", "in_flight", a.inflight.Load())
	} else {
		a.log.Info("drained: no requests in flight")
	}
}

// settled reports whether the relay has closed every stream of every live
// connection, so closing them loses nothing on its way.
func (a *Agent) settled() bool {
	for _, c := range a.slots.all() {
		if s := c.session(); s != nil && !sessionSettled(s) {
			return false
		}
	}
	return true
}

// Connected is how many relay connections are up now.
func (a *Agent) Connected() int {
	n := 0
	for _, c := range a.slots.all() {
		if c.snapshot().Connected {
			n++
		}
	}
	return n
}

func (a *Agent) diagHandler() http.Handler {
	return statuspage.Admin{
		Page:     a.page,
		PageData: func() any { return a.Status() },
		Ready: func() (bool, string) {
			return a.Connected() > 0, "no relay connection"
		},
		Metrics: metrics.Handler(a.metrics.Registry),
		JSON:    map[string]func() any{"/v1/status": func() any { return a.Status() }},
		Pprof:   a.config().Diagnostics.Pprof,
	}.Handler()
}

// Status is the agent's /v1/status document.
type Status struct {
	AgentID     string       `json:"agent_id"`
	Version     string       `json:"version"`
	Relay       string       `json:"relay"`
	Connected   int          `json:"connected"`
	Connections []ConnStatus `json:"connections"`
	// Finishing: connections that take no new requests and close once
	// those they carry are done (after a goaway, a move to new relay
	// settings, or fewer relay.connections).
	Finishing     int                `json:"finishing_connections"`
	Config        config.LoadState   `json:"config"`
	Upstreams     []string           `json:"upstreams"`
	Load          []UpstreamLoad     `json:"load"` // per upstream, in Upstreams' order
	StartedAt     time.Time          `json:"started_at"`
	UptimeSec     int64              `json:"uptime_seconds"`
	Requests      RequestStats       `json:"requests"`
	Credentials   []CredentialReport `json:"credentials"`
	RecentDenials []audit.Entry      `json:"recent_denials"`
	Audit         *audit.State       `json:"audit,omitempty"` // nil: no audit log
	Webhooks      *WebhookStatus     `json:"webhooks,omitempty"`
}

// Status reports the agent's state.
func (a *Agent) Status() Status {
	cfg, ups := a.config(), a.upstreams()
	s := Status{
		AgentID: cfg.AgentID, Version: version.Version, Relay: cfg.Relay.URL, Config: a.loads.State(), Upstreams: ups.names,
		StartedAt: a.started, UptimeSec: int64(time.Since(a.started).Seconds()), Requests: a.stats.snapshot(),
		Finishing: int(a.finishing.Load()),
	}
	for _, c := range a.slots.all() {
		cs := c.snapshot()
		if cs.Connected {
			s.Connected++
		}
		s.Connections = append(s.Connections, cs)
	}
	for _, name := range ups.names {
		s.Load = append(s.Load, ups.byName[name].gate.load(name))
	}
	a.credMu.Lock()
	for _, name := range ups.names {
		if rep, ok := a.creds[name]; ok {
			s.Credentials = append(s.Credentials, rep)
		}
	}
	a.credMu.Unlock()
	s.RecentDenials = a.denials.List()
	if a.audit != nil {
		st := a.audit.State()
		s.Audit = &st
	}
	if a.webhooks != nil {
		s.Webhooks = a.webhooks.status()
	}
	return s
}

// connState tracks one relay connection slot for status and readiness.
type connState struct {
	slot       int
	rebalanced int           // rebalance goaways in a row; owned by keepConnected
	move       chan *moveReq // a reload's new relay settings, taken by the live connection
	retire     chan struct{} // closed when a reload removes the slot: drain it and stop

	mu sync.Mutex
	st ConnStatus

	ctrlMu sync.Mutex
	ctrl   *yamux.Stream  // the live connection's control stream, or nil
	sess   *yamux.Session // the live connection, for agent-opened streams (webhooks), or nil
	ack    chan struct{}  // closed when the relay acknowledges draining
}

// retired reports whether a reload removed the slot.
func (c *connState) retired() bool {
	select {
	case <-c.retire:
		return true
	default:
		return false
	}
}

// setLive records the slot's live connection (nil, nil: none).
func (c *connState) setLive(ctrl *yamux.Stream, sess *yamux.Session) {
	c.ctrlMu.Lock()
	c.ctrl, c.sess = ctrl, sess
	if c.ack != nil {
		close(c.ack) // a connection that is gone sends no more streams
		c.ack = nil
	}
	c.ctrlMu.Unlock()
}

// session is the slot's live session, or nil.
func (c *connState) session() *yamux.Session {
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	if c.sess == nil || c.sess.IsClosed() {
		return nil
	}
	return c.sess
}

// startDrain asks the relay to stop sending streams on the live
// connection, returning a channel closed on its ack (nil: no connection).
// Asked again before the ack, it returns the same channel.
func (c *connState) startDrain() chan struct{} {
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	if c.ctrl == nil {
		return nil
	}
	if c.ack != nil {
		return c.ack
	}
	c.ack = make(chan struct{})
	c.ctrl.SetWriteDeadline(time.Now().Add(2 * time.Second))
	if err := proto.WriteMessage(c.ctrl, proto.Message{Type: proto.MsgDraining}); err != nil {
		c.ack = nil
		return nil
	}
	return c.ack
}

// drainAcked records the relay's ack of draining.
func (c *connState) drainAcked() {
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	if c.ack != nil {
		close(c.ack)
		c.ack = nil
	}
}

// ConnStatus describes one relay connection slot.
type ConnStatus struct {
	Slot         int       `json:"slot"`
	Connected    bool      `json:"connected"`
	Since        time.Time `json:"since,omitempty"`
	RelayID      string    `json:"relay_id,omitempty"`
	ConnectionID string    `json:"connection_id,omitempty"`
	Reconnects   int       `json:"reconnects"`
	LastError    string    `json:"last_error,omitempty"`
	LastErrorAt  time.Time `json:"last_error_at,omitempty"`
	// RelayCertNotAfter: when the certificate the relay presented on
	// this connection expires (zero over ws://).
	RelayCertNotAfter time.Time `json:"relay_certificate_not_after,omitzero"`
}

func (c *connState) connected(welcome proto.Message, certNotAfter time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.st.Connected, c.st.Since = true, time.Now()
	c.st.RelayID, c.st.ConnectionID = welcome.RelayID, welcome.ConnectionID
	c.st.RelayCertNotAfter = certNotAfter
}

func (c *connState) failed(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.st.Connected {
		c.st.Reconnects++
	}
	c.st.Connected, c.st.Since = false, time.Now()
	if err != nil {
		c.st.LastError, c.st.LastErrorAt = err.Error(), time.Now()
	}
}

func (c *connState) snapshot() ConnStatus {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.st
	s.Slot = c.slot
	return s
}

// stats counts requests for status.
type stats struct {
	mu sync.Mutex
	s  RequestStats
}

// RequestStats summarises requests served since start.
type RequestStats struct {
	Total        int64     `json:"total"`
	Allowed      int64     `json:"allowed"`
	Denied       int64     `json:"denied"`
	LastDenial   string    `json:"last_denial,omitempty"`
	LastDeniedAt time.Time `json:"last_denied_at,omitempty"`
}

func (s *stats) record(e audit.Entry) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.s.Total++
	if e.Decision == "allow" {
		s.s.Allowed++
		return
	}
	s.s.Denied++
	s.s.LastDenial = e.Method + " " + e.Path + " (" + e.Rule + ")"
	s.s.LastDeniedAt = e.Time
}

func (s *stats) snapshot() RequestStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.s
}

// Metrics exposes the agent's metrics (tests, embedding).
func (a *Agent) Metrics() *metrics.Agent { return a.metrics }

// CloseIdleConnections closes the idle connections to every upstream;
// requests in flight keep theirs.
func (a *Agent) CloseIdleConnections() { a.upstreams().closeIdle() }

const agentPage = `<h1>ferry agent <code>{{.AgentID}}</code></h1>
<div class="sub">version {{.Version}} · relay <code>{{.Relay}}</code> · up since {{ts .StartedAt}} ({{ago .StartedAt}})</div>
{{with .Config}}{{if .LastError}}<p class="bad">config reload refused {{ts .LastErrorAt}}: {{.LastError}} — the config loaded {{ts .LoadedAt}} stays in force</p>{{end}}{{end}}
<h2>Relay connections: {{if .Connected}}<span class="ok">{{.Connected}} of {{len .Connections}} up</span>{{else}}<span class="bad">none up</span>{{end}}{{if .Finishing}}, {{.Finishing}} finishing their requests{{end}}</h2>
<table><tr><th>#</th><th>state</th><th>since</th><th>relay</th><th>relay certificate until</th><th class="num">reconnects</th><th>last error</th></tr>
{{range .Connections}}<tr><td>{{.Slot}}</td>{{if .Connected}}<td class="ok">up</td>{{else}}<td class="bad">down</td>{{end}}<td>{{ago .Since}}</td><td>{{.RelayID}}</td><td>{{if not .RelayCertNotAfter.IsZero}}{{ts .RelayCertNotAfter}}{{end}}</td><td class="num">{{.Reconnects}}</td><td>{{if .LastError}}{{ts .LastErrorAt}}: {{.LastError}}{{else}}<span class="empty">none</span>{{end}}</td></tr>
{{end}}</table>
<h2>Upstreams</h2>
<table><tr><th>upstream</th><th>credential</th><th>user</th><th>expires</th><th>checked</th></tr>
{{range .Credentials}}<tr><td><code>{{.Upstream}}</code></td>{{if .Valid}}<td class="ok">accepted</td>{{else}}<td class="bad">{{.Problem}}</td>{{end}}<td>{{.User}}</td><td>{{ts .Expiry}}</td><td>{{ago .Checked}}</td></tr>
{{else}}<tr><td colspan="5" class="empty">{{range $.Upstreams}}<code>{{.}}</code> {{end}}— credentials not checked yet</td></tr>{{end}}</table>
<p>{{range .Load}}<code>{{.Upstream}}</code>: {{.InFlight}} in flight{{if .Limit}} of {{.Limit}} at most{{end}}{{if .Waiting}}, <span class="warn">{{.Waiting}} waiting</span>{{end}}{{if .Refused}}, <span class="bad">{{.Refused}} refused busy since start</span>{{end}} · {{end}}</p>
<h2>Requests: {{.Requests.Total}} ({{.Requests.Allowed}} allowed, {{.Requests.Denied}} denied)</h2>
{{if .RecentDenials}}<table><tr><th>time</th><th>scanner</th><th>request</th><th>rule</th><th>status</th><th>request id</th></tr>
{{range .RecentDenials}}<tr><td>{{ts .Time}}</td><td>{{.Scanner}}</td><td><code>{{.Method}} {{.Path}}</code></td><td><code>{{.Rule}}</code></td><td class="warn">{{.Status}}</td><td><code>{{.RequestID}}</code></td></tr>
{{end}}</table>{{else}}<p class="empty">no denials since start</p>{{end}}
{{with .Audit}}<p>audit log <code>{{.Path}}</code>: {{.Written}} decisions recorded since start{{if .Lost}}, <span class="bad">{{.Lost}} lost</span>{{end}}{{if .LastError}} · <span class="bad">last error {{ts .LastErrorAt}}: {{.LastError}}</span>{{end}}</p>{{end}}
{{with .Webhooks}}<h2>Webhooks: {{.Accepted}} accepted, {{.Forwarded}} delivered since start</h2>
<table><tr><th>listen</th><th>signature</th><th class="num">spooled</th><th>oldest</th><th class="num">quarantined</th><th>last delivered</th><th>last error</th></tr>
<tr><td><code>{{.Listen}}</code></td>{{if .Signed}}<td class="ok">required</td>{{else}}<td class="warn">not checked</td>{{end}}<td class="num">{{.Spool.Spooled}}</td><td>{{if .Spool.Spooled}}{{ago .Spool.Oldest}}{{else}}<span class="empty">empty</span>{{end}}</td>{{if .Spool.Quarantined}}<td class="num bad">{{.Spool.Quarantined}}</td>{{else}}<td class="num">0</td>{{end}}<td>{{ago .LastSent}}</td><td>{{if .LastError}}{{ts .LastErrorAt}}: {{.LastError}}{{else}}<span class="empty">none</span>{{end}}</td></tr></table>
{{with .TLS}}<p>HTTPS; certificate valid until {{ts .NotAfter}}{{if .Problem}} · <span class="bad">renewed files do not load: {{.Problem}}</span>{{end}}</p>{{end}}
{{range .Spool.RecentQuarantine}}<p class="bad">quarantined {{ts .At}}: <code>{{.File}}</code> — {{.Reason}}</p>{{end}}{{end}}`
