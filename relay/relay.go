// Package relay is ferry-relay: it accepts agent connections over WSS and
// exposes each tunnel to authenticated scanners as plain HTTP.
package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httputil"
	"os"
	"slices"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-tunnel/ferry/internal/certfile"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/registry"
	"github.com/ferry-tunnel/ferry/internal/statuspage"
	"github.com/ferry-tunnel/ferry/internal/version"
	"github.com/ferry-tunnel/ferry/proto"
)

// Relay is one relay process. Create with New, bind with Listen, run with
// Serve (or both with Run).
type Relay struct {
	cfg *config.Relay
	log *slog.Logger
	id  string

	auth        atomic.Pointer[authTables]           // replaced by Reload
	timeouts    atomic.Pointer[config.RelayTimeouts] // replaced by Reload; header_read stays as started
	reloadMu    sync.Mutex
	loads       *config.Loads  // for the status page: when the config was loaded, a refused reload
	level       *slog.LevelVar // nil: level not reloadable
	agentCert   *certSource    // nil: plaintext
	scannerCert *certSource

	proxy         *httputil.ReverseProxy
	webhookClient *http.Client

	registry   registry.Registry
	redis      *registry.Redis           // nil: memory registry
	peer       atomic.Pointer[peerProxy] // rebuilt when a reload changes timeouts.agent_response
	peerSecret atomic.Pointer[string]    // from Redis when no peer_secret_file
	limiter    *authLimiter
	metrics    *metrics.Relay

	agentLn, scannerLn, adminLn net.Listener
	internalLn                  net.Listener // replicas forward here; nil with the memory registry

	started  time.Time
	requests atomic.Int64                   // scanner requests answered
	refused  atomic.Int64                   // ... with 4xx
	failed   atomic.Int64                   // ... with 5xx
	recent   *statuspage.Recent[ErrorEvent] // last scanner errors, for the status page
	page     *statuspage.Page

	life     context.Context // cancelled when Serve begins shutting down
	sessMu   sync.Mutex      // guards sessions.Add against the final Wait
	sessDone bool
	sessions sync.WaitGroup // agent connection handlers
	// bodyWriters: goroutines sending request bodies into streams
	// (tunnelTransport); they end with their stream.
	bodyWriters sync.WaitGroup
	// copyBuffers: the buffers bodies cross the relay in, both ways.
	copyBuffers *httpx.BufferPool
	// heads: the buffered writers request heads are written with.
	heads sync.Pool
	// replies: the buffered readers agents' responses are read with,
	// back once a response was read to its end (see streamBody).
	replies  sync.Pool
	stopping atomic.Bool
	// certCheck: how often the certificate files are looked at for a
	// renewal (certfile.CheckEvery; tests shorten it).
	certCheck time.Duration
	// See the constants; tests lower them.
	retireStreamID, forceRetireStreamID uint32
	retireGrace                         time.Duration
	// hooks: webhook deliveries in flight, which shutdown lets finish
	// within its grace (a delivery cut after the target took it is sent
	// again). hookMu guards hooks.Add against that Wait; hooksClosed:
	// the relay takes no more.
	hookMu      sync.Mutex
	hooksClosed bool
	hooks       sync.WaitGroup
}

// New builds a relay from a validated config.
func New(cfg *config.Relay, log *slog.Logger) (*Relay, error) {
	host, _ := os.Hostname()
	r := &Relay{cfg: cfg, log: log, id: host + "-" + httperr.NewRequestID()[:8], limiter: newAuthLimiter(), metrics: metrics.NewRelay(),
		started: time.Now(), recent: statuspage.NewRecent[ErrorEvent](25), page: statuspage.New("ferry relay", "/v1/tunnels", relayPage), loads: config.NewLoads(cfg.File)}
	r.auth.Store(buildAuth(cfg, nil))
	tmo := cfg.Timeouts
	r.timeouts.Store(&tmo)
	for _, tc := range cfg.Tunnels {
		r.metrics.AgentConnections.WithLabelValues(tc.ID).Set(0)
		r.metrics.StreamsInFlight.WithLabelValues(tc.ID).Set(0)
	}
	r.certCheck = certfile.CheckEvery
	r.retireStreamID, r.forceRetireStreamID, r.retireGrace = retireStreamID, forceRetireStreamID, retireGrace
	r.copyBuffers = httpx.NewBufferPool(128 << 10)
	r.proxy = r.newProxy()
	r.webhookClient = newWebhookClient()
	r.peer.Store(r.newPeerProxy(tmo.AgentResponse))
	r.registry = registry.Memory{}
	r.metrics.RegistryUp.Set(1)
	if cfg.Registry.Backend == "redis" {
		red, err := registry.NewRedis(cfg.Registry.RedisURL, cfg.Registry.AdvertiseURL, log.With("component", "registry"))
		if err != nil {
			return nil, err
		}
		red.OnChange = func(problem string) {
			if problem == "" {
				r.metrics.RegistryUp.Set(1)
			} else {
				r.metrics.RegistryUp.Set(0)
			}
		}
		r.metrics.RegistryUp.Set(0)
		r.registry, r.redis = red, red
	}
	return r, nil
}

// Listen binds the three listeners, so that callers (and tests using port
// 0) know the addresses before Serve.
func (r *Relay) Listen() error {
	var err error
	if r.agentLn, err = listen("agent_listen", r.cfg.AgentListen); err != nil {
		return err
	}
	// Beneath TLS, so that a tunnel can send a batch of frames in one
	// syscall (see proto.CorkConn).
	r.agentLn = proto.CorkListener{Listener: r.agentLn}
	if r.cfg.TLS != nil {
		if r.agentCert, err = newCertSource("agent", r.cfg.TLS); err != nil {
			r.closeListeners()
			return err
		}
		r.agentLn = tls.NewListener(r.agentLn, serverTLS(r.agentCert))
	}
	if r.scannerLn, err = listen("scanner_listen", r.cfg.ScannerListen); err != nil {
		r.closeListeners()
		return err
	}
	if r.cfg.ScannerTLS != nil {
		if r.scannerCert, err = newCertSource("scanner", r.cfg.ScannerTLS); err != nil {
			r.closeListeners()
			return err
		}
		r.scannerLn = tls.NewListener(r.scannerLn, serverTLS(r.scannerCert))
	}
	if r.adminLn, err = listen("admin_listen", r.cfg.AdminListen); err != nil {
		r.closeListeners()
		return err
	}
	if r.redis != nil {
		if r.internalLn, err = listen("registry.internal_listen", r.cfg.Registry.InternalListen); err != nil {
			r.closeListeners()
			return err
		}
	}
	return nil
}

func listen(what, addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", what, addr, err)
	}
	return ln, nil
}

// serverTLS serves the source's current certificate, so a reload
// rotates it for new connections.
func serverTLS(c *certSource) *tls.Config {
	return &tls.Config{GetCertificate: c.GetCertificate, MinVersion: tls.VersionTLS12, NextProtos: []string{"http/1.1"}}
}

// SetLevelVar lets Reload change the log level the logger was built with.
func (r *Relay) SetLevelVar(v *slog.LevelVar) { r.level = v }

func (r *Relay) closeListeners() {
	for _, ln := range []net.Listener{r.agentLn, r.scannerLn, r.adminLn, r.internalLn} {
		if ln != nil {
			ln.Close()
		}
	}
}

// AgentAddr, ScannerAddr and AdminAddr are the bound addresses.
func (r *Relay) AgentAddr() string   { return r.agentLn.Addr().String() }
func (r *Relay) ScannerAddr() string { return r.scannerLn.Addr().String() }
func (r *Relay) AdminAddr() string   { return r.adminLn.Addr().String() }

// InternalAddr is the bound internal listener ("" with the memory registry).
func (r *Relay) InternalAddr() string {
	if r.internalLn == nil {
		return ""
	}
	return r.internalLn.Addr().String()
}

// Run binds and serves until ctx is done.
func Run(ctx context.Context, cfg *config.Relay, log *slog.Logger) error {
	r, err := New(cfg, log)
	if err != nil {
		return err
	}
	if err := r.Listen(); err != nil {
		return err
	}
	return r.Serve(ctx)
}

// Serve runs the listeners bound by Listen until ctx is done, then shuts
// down: scanner requests in flight get timeouts.shutdown_grace to finish, agents are
// told to go away, and every goroutine is waited for.
func (r *Relay) Serve(ctx context.Context) error {
	life, stopLife := context.WithCancel(context.Background())
	defer stopLife()
	r.life = life

	agentMux := http.NewServeMux()
	agentMux.HandleFunc("GET "+proto.ConnectPath, r.handleConnect)
	agentMux.HandleFunc("/", func(w http.ResponseWriter, req *http.Request) {
		httperr.Write(w, http.StatusNotFound, httperr.NotFound, "agents connect to "+proto.ConnectPath)
	})
	agentSrv := r.newServer(agentMux, 16<<10)
	agentSrv.ConnContext = func(ctx context.Context, c net.Conn) context.Context {
		slot := &proto.CorkSlot{}
		slot.Add(proto.CorkOf(c))
		return proto.WithCorkSlot(ctx, slot)
	}
	servers := []*http.Server{
		agentSrv,
		r.newServer(http.HandlerFunc(r.serveScanner), 64<<10),
		r.newServer(r.adminHandler(), 16<<10),
	}
	lns := []net.Listener{r.agentLn, r.scannerLn, r.adminLn}
	// With the Redis registry: the internal listener (requests forwarded
	// by other replicas) and the heartbeat.
	regCtx, stopRegistry := context.WithCancel(context.Background())
	defer stopRegistry()
	regDone := make(chan struct{})
	if r.redis != nil {
		servers = append(servers, r.newServer(http.HandlerFunc(r.servePeer), 64<<10))
		lns = append(lns, r.internalLn)
		go func() {
			defer close(regDone)
			r.runRegistry(regCtx, r.redis)
		}()
	} else {
		close(regDone)
	}
	errc := make(chan error, len(servers))
	for i, s := range servers {
		go func() { errc <- s.Serve(lns[i]) }()
	}
	r.log.Info("relay started", "version", version.Version, "relay_id", r.id, "agent_listen", r.AgentAddr(),
		"scanner_listen", r.ScannerAddr(), "admin_listen", r.AdminAddr(), "tls", r.cfg.TLS != nil, "tunnels", len(r.auth.Load().tunnels),
		"registry", r.cfg.Registry.Backend, "internal_listen", r.InternalAddr(), "advertise_url", r.cfg.Registry.AdvertiseURL)
	var certWatch sync.WaitGroup
	if srcs := r.certSources(); len(srcs) > 0 {
		for _, cs := range srcs {
			r.noteCert(cs, "TLS certificate loaded", "start")
		}
		certWatch.Go(func() { r.watchCerts(life, r.certCheck) })
	}

	var runErr error
	pending := len(servers) // Serve results still to collect
	select {
	case <-ctx.Done():
	case runErr = <-errc:
		pending--
		runErr = fmt.Errorf("listener failed: %w", runErr)
	}
	r.stopping.Store(true)
	r.hookMu.Lock()
	r.hooksClosed = true
	r.hookMu.Unlock()
	grace := r.tmo().ShutdownGrace
	r.log.Info("relay shutting down", "grace", grace.String())
	// Leave the registry first, so other replicas stop sending requests
	// here while those in flight finish.
	stopRegistry()
	<-regDone
	if r.redis != nil {
		r.redis.Close()
	}

	// Stop taking agents and tell those connected to reconnect (to another
	// replica, or to this address once it is back); scanner requests in
	// flight finish on the old connections, which the agents keep serving.
	servers[0].Close()
	for _, t := range r.auth.Load().tunnels {
		for _, c := range t.snapshot() {
			c.goAway("relay shutting down")
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), grace)
	defer cancel()
	// Scanner requests, and those forwarded by other replicas, get the
	// same grace, at the same time.
	var drained sync.WaitGroup
	for _, srv := range append([]*http.Server{servers[1]}, servers[3:]...) {
		drained.Go(func() {
			if err := srv.Shutdown(sctx); err != nil {
				r.log.Warn("requests cut at end of shutdown grace", "err", err)
				srv.Close()
			}
		})
	}
	// Webhook deliveries too: one cancelled after the target took it
	// would reach the target twice.
	drained.Go(func() {
		hooksDone := make(chan struct{})
		go func() { r.hooks.Wait(); close(hooksDone) }() // ends with the deliveries, which stopLife ends at the latest
		select {
		case <-hooksDone:
		case <-sctx.Done():
			r.log.Warn("webhook deliveries cut at end of shutdown grace; the agents send them again")
		}
	})
	drained.Wait()
	stopLife()
	certWatch.Wait()
	r.sessMu.Lock()
	r.sessDone = true
	r.sessMu.Unlock()
	r.sessions.Wait()
	servers[2].Close()
	r.bodyWriters.Wait()
	r.webhookClient.CloseIdleConnections()
	r.peer.Load().tr.CloseIdleConnections()
	for ; pending > 0; pending-- {
		if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) && runErr == nil {
			runErr = err
		}
	}
	r.log.Info("relay stopped")
	return runErr
}

// trackSession registers an agent connection handler with Serve, or
// reports false when the relay is past the point of taking any.
func (r *Relay) trackSession() bool {
	r.sessMu.Lock()
	defer r.sessMu.Unlock()
	if r.sessDone || r.stopping.Load() {
		return false
	}
	r.sessions.Add(1)
	return true
}

func (r *Relay) newServer(h http.Handler, maxHeader int) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: r.cfg.Timeouts.HeaderRead,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    maxHeader,
		ErrorLog:          logging.ServerErrorLog(r.log),
	}
}

// adminHandler serves health, readiness and the tunnel list.
func (r *Relay) adminHandler() http.Handler {
	return statuspage.Admin{
		Page:     r.page,
		PageData: func() any { return r.Status() },
		Ready: func() (bool, string) {
			return !r.stopping.Load(), "shutting down"
		},
		Degraded: func() string {
			if p := r.registry.Problem(); p != "" {
				return "registry unavailable (" + p + "); serving only tunnels held by this replica"
			}
			return ""
		},
		Metrics: metrics.Handler(r.metrics.Registry),
		JSON: map[string]func() any{
			"/v1/tunnels": func() any { return r.tunnelStatus() },
			"/v1/status":  func() any { return r.Status() },
		},
		Pprof: r.cfg.AdminPprof,
	}.Handler()
}

// TunnelStatus is one entry of /v1/tunnels.
type TunnelStatus struct {
	ID          string             `json:"id"`
	Online      bool               `json:"online"`
	Connections []ConnectionStatus `json:"connections"`
}

// ConnectionStatus describes one agent connection.
type ConnectionStatus struct {
	ID          string    `json:"id"`
	AgentID     string    `json:"agent_id"`
	Version     string    `json:"version"`
	Remote      string    `json:"remote"`
	ConnectedAt time.Time `json:"connected_at"`
	Upstreams   []string  `json:"upstreams"`
	InFlight    int64     `json:"in_flight"`
	Served      int64     `json:"served"`
	// KeptStreams: idle keep-alive streams waiting for the next request.
	KeptStreams int  `json:"kept_streams"`
	Draining    bool `json:"draining"`
}

func (r *Relay) tunnelStatus() []TunnelStatus {
	out := []TunnelStatus{}
	for _, t := range r.auth.Load().tunnels {
		ts := TunnelStatus{ID: t.id, Connections: []ConnectionStatus{}}
		for _, c := range t.snapshot() {
			ups := c.upstreamNames()
			ts.Connections = append(ts.Connections, ConnectionStatus{
				ID: c.id, AgentID: c.agentID, Version: c.version, Remote: c.remote, ConnectedAt: c.connectedAt,
				Upstreams: ups, InFlight: c.inflight.Load(), Served: c.served.Load(), KeptStreams: c.pool.len(), Draining: c.draining.Load(),
			})
		}
		ts.Online = len(ts.Connections) > 0
		out = append(out, ts)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// tmo is the timeouts in force (a reload may change them, but for
// header_read, which the listeners took at start).
func (r *Relay) tmo() *config.RelayTimeouts { return r.timeouts.Load() }

// Metrics exposes the relay's metrics (tests, embedding).
func (r *Relay) Metrics() *metrics.Relay { return r.metrics }

// ErrorEvent is a scanner request answered with an error.
type ErrorEvent struct {
	Time      time.Time `json:"time"`
	RequestID string    `json:"request_id"`
	Tunnel    string    `json:"tunnel"`
	Scanner   string    `json:"scanner"`
	Method    string    `json:"method"`
	Path      string    `json:"path"`
	Status    int       `json:"status"`
	Code      string    `json:"code"`
}

// Status is the relay's /v1/status document, which the status page and
// ferry-relay status show.
type Status struct {
	RelayID         string           `json:"relay_id"`
	Version         string           `json:"version"`
	Registry        string           `json:"registry"`
	Advertise       string           `json:"advertise_url,omitempty"`
	RegistryProblem string           `json:"registry_problem,omitempty"` // "": the registry works
	Started         time.Time        `json:"started_at"`
	Config          config.LoadState `json:"config"`
	Certs           []CertStatus     `json:"certificates"`
	Tunnels         []TunnelStatus   `json:"tunnels"`
	Scanners        []ScannerStatus  `json:"scanners"`
	// Scanner requests since start: all, refused (4xx) and failed (5xx).
	Requests int64 `json:"requests"`
	Refused  int64 `json:"refused"`
	Failed   int64 `json:"failed"`
	// Recent: the last scanner requests answered with an error.
	Recent []ErrorEvent `json:"recent_errors"`
}

// ScannerStatus describes one configured scanner.
type ScannerStatus struct {
	Name       string   `json:"name"`
	Tunnels    []string `json:"tunnels"`
	InFlight   int64    `json:"in_flight"`
	MaxStreams int64    `json:"max_streams"` // 0: none
	OverLimit  int64    `json:"refused_over_max_streams"`
}

func (r *Relay) scannerStatus() []ScannerStatus {
	out := []ScannerStatus{}
	for _, sa := range r.auth.Load().scanners { // the running config's order
		out = append(out, ScannerStatus{Name: sa.name, Tunnels: slices.Sorted(maps.Keys(sa.tunnels)), InFlight: sa.load.requests.Load(),
			MaxStreams: sa.maxStreams, OverLimit: sa.load.overLimit.Load()})
	}
	return out
}

// CertStatus describes a listener's TLS certificate.
type CertStatus struct {
	Listener string    `json:"listener"`
	NotAfter time.Time `json:"not_after"`
	DaysLeft int       `json:"days_left"`
	Soon     bool      `json:"renew_soon"`        // under 14 days left (certfile.Urgency)
	Problem  string    `json:"problem,omitempty"` // renewed files that do not load
}

// Status reports the relay's state.
func (r *Relay) Status() Status {
	return Status{
		RelayID: r.id, Version: version.Version, Started: r.started, Tunnels: r.tunnelStatus(),
		Registry: r.cfg.Registry.Backend, Advertise: r.cfg.Registry.AdvertiseURL, RegistryProblem: r.registry.Problem(),
		Requests: r.requests.Load(), Refused: r.refused.Load(), Failed: r.failed.Load(), Recent: r.recent.List(),
		Certs: r.certStatus(), Scanners: r.scannerStatus(), Config: r.loads.State(),
	}
}

func (r *Relay) certStatus() []CertStatus {
	out := []CertStatus{}
	for _, cs := range r.certSources() {
		na := cs.NotAfter()
		level, _ := certfile.Urgency(na)
		out = append(out, CertStatus{Listener: cs.listener, NotAfter: na, DaysLeft: certfile.DaysLeft(na), Soon: level > slog.LevelInfo, Problem: cs.Problem()})
	}
	return out
}

const relayPage = `<h1>ferry relay <code>{{.RelayID}}</code></h1>
<div class="sub">version {{.Version}} · up since {{ts .Started}} ({{ago .Started}}) · {{.Requests}} scanner requests, {{.Refused}} refused (4xx), {{.Failed}} failed (5xx)</div>
<div class="sub">registry: {{.Registry}}{{if .Advertise}} · this replica: <code>{{.Advertise}}</code>{{end}}{{if .RegistryProblem}} · <span class="bad">degraded: {{.RegistryProblem}}</span>{{end}}</div>
{{range .Certs}}<div class="sub">{{.Listener}} TLS certificate valid until {{ts .NotAfter}} (<span class="{{if .Soon}}bad{{else}}ok{{end}}">{{.DaysLeft}} days left</span>){{if .Problem}} · <span class="bad">renewed files do not load: {{.Problem}}</span>{{end}}</div>
{{end}}{{with .Config}}{{if .LastError}}<div class="sub bad">config reload refused {{ts .LastErrorAt}}: {{.LastError}} — the config loaded {{ts .LoadedAt}} stays in force</div>{{end}}{{end}}
<h2>Tunnels</h2>
<table><tr><th>tunnel</th><th>state</th><th>agent</th><th>version</th><th>from</th><th>connected</th><th>upstreams</th><th class="num">in flight</th><th class="num">served</th></tr>
{{range .Tunnels}}{{$t := .}}{{if .Connections}}{{range .Connections}}<tr><td><code>{{$t.ID}}</code></td><td class="ok">online</td><td>{{.AgentID}}</td><td>{{.Version}}</td><td>{{.Remote}}</td><td>{{ago .ConnectedAt}}</td><td>{{range .Upstreams}}<code>{{.}}</code> {{end}}</td><td class="num">{{.InFlight}}</td><td class="num">{{.Served}}</td></tr>
{{end}}{{else}}<tr><td><code>{{.ID}}</code></td><td class="bad">offline</td><td colspan="7" class="empty">no agent connected: scanners get 503 tunnel_offline</td></tr>
{{end}}{{end}}</table>
<h2>Scanners</h2>
<table><tr><th>scanner</th><th>tunnels</th><th class="num">in flight</th><th class="num">max_streams</th><th class="num">refused over it</th></tr>
{{range .Scanners}}<tr><td>{{.Name}}</td><td>{{range .Tunnels}}<code>{{.}}</code> {{end}}</td><td class="num">{{.InFlight}}</td><td class="num">{{if .MaxStreams}}{{.MaxStreams}}{{else}}<span class="empty">none</span>{{end}}</td>{{if .OverLimit}}<td class="num warn">{{.OverLimit}}</td>{{else}}<td class="num">0</td>{{end}}</tr>
{{end}}</table>
<h2>Recent scanner errors</h2>
{{if .Recent}}<table><tr><th>time</th><th>status</th><th>error</th><th>tunnel</th><th>scanner</th><th>request</th><th>request id</th></tr>
{{range .Recent}}<tr><td>{{ts .Time}}</td><td class="{{if ge .Status 500}}bad{{else}}warn{{end}}">{{.Status}}</td><td>{{.Code}}</td><td>{{.Tunnel}}</td><td>{{.Scanner}}</td><td><code>{{.Method}} {{.Path}}</code></td><td><code>{{.RequestID}}</code></td></tr>
{{end}}</table>{{else}}<p class="empty">none since start</p>{{end}}`
