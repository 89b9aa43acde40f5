package agent

import (
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ferry-tunnel/ferry/internal/certfile"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/secret"
	"github.com/ferry-tunnel/ferry/internal/spool"
)

// maxConcurrentAccepts bounds webhook requests being read at once (their
// bodies are held in memory up to max_body_kb while verified and spooled);
// more wait up to acceptWait for a slot before being told to retry.
const (
	maxConcurrentAccepts = 16
	acceptWait           = 10 * time.Second
)

// webhooks receives Bitbucket's webhooks, spools them and forwards them
// through the tunnel. Created by Listen when webhooks.listen is set.
type webhooks struct {
	cfg     atomic.Pointer[config.Webhooks] // reload swaps it; what keepRestartOnly keeps stays as at start
	log     *slog.Logger
	spool   *spool.Spool
	ln      net.Listener
	cert    *certfile.Source // nil: plain HTTP
	metrics *metrics.Agent
	lanes   []*lane
	accept  chan struct{} // semaphore, maxConcurrentAccepts

	mu          sync.Mutex
	accepted    int64
	forwarded   int64
	lastError   string
	lastErrorAt time.Time
	lastSent    time.Time
}

// openWebhooks binds the listener and opens the spool, queueing what a
// previous run left in it.
func openWebhooks(cfg config.Webhooks, log *slog.Logger, m *metrics.Agent) (*webhooks, error) {
	log = log.With("component", "webhooks")
	sp, left, err := spool.Open(cfg.SpoolDir, spool.Limits{MaxBytes: int64(cfg.SpoolMaxMB) << 20, MaxCount: cfg.SpoolMaxCount}, log)
	if err != nil {
		return nil, fmt.Errorf("webhooks.spool_dir %s: %w", cfg.SpoolDir, err)
	}
	var cert *certfile.Source
	if cfg.TLS != nil {
		if cert, err = certfile.Load(cfg.TLS.CertFile, cfg.TLS.KeyFile); err != nil {
			return nil, fmt.Errorf("webhooks.tls: %w", err)
		}
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("webhooks.listen %s: %w", cfg.Listen, err)
	}
	if cert != nil {
		ln = tls.NewListener(ln, cert.ServerConfig())
	}
	w := &webhooks{log: log, spool: sp, ln: ln, cert: cert, metrics: m, accept: make(chan struct{}, maxConcurrentAccepts)}
	w.cfg.Store(&cfg)
	for range cfg.Lanes {
		w.lanes = append(w.lanes, newLane())
	}
	for _, e := range left {
		w.enqueue(e)
	}
	if len(left) > 0 {
		log.Info("webhook deliveries left in the spool by the previous run will be forwarded", "count", len(left))
	}
	m.Registry.MustRegister(spoolCollector{sp})
	return w, nil
}

// spoolCollector reports the spool's gauges from one Stats call per scrape.
type spoolCollector struct{ sp *spool.Spool }

var (
	spooledDesc = prometheus.NewDesc("ferry_agent_webhook_spooled",
		"Webhook deliveries in the spool now (accepted, not yet confirmed by the target).", nil, nil)
	oldestDesc = prometheus.NewDesc("ferry_agent_webhook_oldest_spooled_age_seconds",
		"Age of the oldest spooled webhook delivery (0: spool empty).", nil, nil)
	quarantinedDesc = prometheus.NewDesc("ferry_agent_webhook_quarantined_files",
		"Corrupt spool files moved to the spool's quarantine/ directory.", nil, nil)
)

func (spoolCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- spooledDesc
	ch <- oldestDesc
	ch <- quarantinedDesc
}

func (c spoolCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.sp.Stats()
	age := 0.0
	if !st.Oldest.IsZero() {
		age = time.Since(st.Oldest).Seconds()
	}
	ch <- prometheus.MustNewConstMetric(spooledDesc, prometheus.GaugeValue, float64(st.Spooled))
	ch <- prometheus.MustNewConstMetric(oldestDesc, prometheus.GaugeValue, age)
	ch <- prometheus.MustNewConstMetric(quarantinedDesc, prometheus.GaugeValue, float64(st.Quarantined))
}

// Addr is the bound listener address.
func (w *webhooks) Addr() string { return w.ln.Addr().String() }

// ServeHTTP accepts one delivery from Bitbucket: verify, spool (fsynced),
// answer 202, queue for forwarding.
func (w *webhooks) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	log := w.log.With("remote", r.RemoteAddr, "event", r.Header.Get("X-Event-Key"), "bitbucket_request_id", r.Header.Get("X-Request-Id"))
	if r.Method != http.MethodPost {
		rw.Header().Set("Allow", http.MethodPost)
		w.refuse(rw, log, http.StatusMethodNotAllowed, "method", "webhooks are POSTed")
		return
	}
	wait := time.NewTimer(acceptWait)
	defer wait.Stop()
	select {
	case w.accept <- struct{}{}:
		defer func() { <-w.accept }()
	case <-r.Context().Done():
		return
	case <-wait.C:
		rw.Header().Set("Retry-After", "5")
		w.refuse(rw, log, http.StatusServiceUnavailable, "busy", "too many webhook deliveries being received at once; retry")
		return
	}
	cfg := w.config()
	body, err := io.ReadAll(http.MaxBytesReader(rw, r.Body, int64(cfg.MaxBodyKB)<<10))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			w.refuse(rw, log, http.StatusRequestEntityTooLarge, "too_large", fmt.Sprintf("webhook body exceeds webhooks.max_body_kb (%d KiB)", cfg.MaxBodyKB))
			return
		}
		w.refuse(rw, log, http.StatusBadRequest, "bad_body", "reading the body: "+err.Error())
		return
	}
	if cfg.Secret != nil {
		if problem := w.checkSignature(cfg.Secret, r.Header.Get("X-Hub-Signature"), body); problem != "" {
			w.refuse(rw, log, http.StatusUnauthorized, "signature", problem)
			return
		}
	}
	d := spool.Delivery{ID: spool.NewID(), Received: time.Now().UTC(), Repo: repoOf(body), Event: r.Header.Get("X-Event-Key"),
		Header: httpx.WebhookHeaders(r.Header), Body: body}
	e, err := w.spool.Put(d)
	switch {
	case errors.Is(err, spool.ErrFull):
		rw.Header().Set("Retry-After", "60")
		st := w.spool.Stats()
		w.refuse(rw, log, http.StatusServiceUnavailable, "spool_full",
			fmt.Sprintf("webhook spool is full (%d deliveries, %d bytes; limits %d, %d): the cloud target has not been reachable; retry later", st.Spooled, st.Bytes, st.MaxCount, st.MaxBytes))
		return
	case errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT):
		// Like a full spool: nothing was stored, and room may come back.
		log.Error("cannot spool webhook delivery: the spool's disk is full; answering 503", "err", err)
		w.metrics.WebhookRefused.WithLabelValues("disk_full").Inc()
		rw.Header().Set("Retry-After", "60")
		http.Error(rw, "the agent's webhook spool disk is full; retry later", http.StatusServiceUnavailable)
		return
	case err != nil:
		log.Error("cannot spool webhook delivery; answering 500 so the sender retries", "err", err)
		w.metrics.WebhookRefused.WithLabelValues("spool_error").Inc()
		http.Error(rw, "cannot store the delivery: "+err.Error(), http.StatusInternalServerError)
		return
	}
	w.mu.Lock()
	w.accepted++
	w.mu.Unlock()
	w.metrics.WebhookAccepted.Inc()
	log.Info("webhook accepted and spooled", "delivery_id", e.ID, "repo", e.Repo, "bytes", len(body))
	rw.Header().Set("Content-Type", "application/json")
	rw.Header().Set("X-Ferry-Delivery-Id", e.ID)
	rw.WriteHeader(http.StatusAccepted)
	json.NewEncoder(rw).Encode(map[string]string{"delivery_id": e.ID})
	w.enqueue(e)
}

func (w *webhooks) refuse(rw http.ResponseWriter, log *slog.Logger, status int, reason, msg string) {
	w.metrics.WebhookRefused.WithLabelValues(reason).Inc()
	log.Warn("webhook refused", "status", status, "reason", reason, "detail", msg)
	http.Error(rw, msg, status)
}

// checkSignature verifies Bitbucket's X-Hub-Signature: sha256=<hex HMAC
// of the raw body>. It returns what is wrong, or "".
func (w *webhooks) checkSignature(src secret.Source, header string, body []byte) string {
	key, err := src.Value()
	if err != nil {
		w.log.Error("webhook secret unreadable; refusing deliveries until it is fixed", "err", err)
		return "webhook secret unreadable on the agent"
	}
	if header == "" {
		return "X-Hub-Signature missing: set the same secret on the Bitbucket webhook"
	}
	algo, sig, ok := strings.Cut(header, "=")
	if !ok || algo != "sha256" {
		return "X-Hub-Signature must be sha256=<hex>"
	}
	got, err := hex.DecodeString(sig)
	if err != nil {
		return "X-Hub-Signature is not hex"
	}
	mac := hmac.New(sha256.New, []byte(key))
	mac.Write(body)
	if !hmac.Equal(got, mac.Sum(nil)) {
		return "X-Hub-Signature does not match the body (wrong secret, or the body was altered)"
	}
	return ""
}

// repoOf finds "PROJ/slug" in a Bitbucket DC webhook payload: the event's
// repository, or for pull-request events the target repository.
func repoOf(body []byte) string {
	type repo struct {
		Slug    string `json:"slug"`
		Project struct {
			Key string `json:"key"`
		} `json:"project"`
	}
	var p struct {
		Repository  *repo `json:"repository"`
		PullRequest *struct {
			ToRef struct {
				Repository *repo `json:"repository"`
			} `json:"toRef"`
		} `json:"pullRequest"`
	}
	if json.Unmarshal(body, &p) != nil {
		return ""
	}
	r := p.Repository
	if r == nil && p.PullRequest != nil {
		r = p.PullRequest.ToRef.Repository
	}
	if r == nil || r.Slug == "" {
		return ""
	}
	return r.Project.Key + "/" + r.Slug
}

// enqueue puts e on its repository's lane, so one repository's deliveries
// go out in the order they were accepted.
func (w *webhooks) enqueue(e spool.Entry) {
	h := fnv.New32a()
	h.Write([]byte(e.Repo))
	w.lanes[h.Sum32()%uint32(len(w.lanes))].push(e)
}

func (w *webhooks) noteError(msg string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.lastError, w.lastErrorAt = msg, time.Now()
}

// WebhookStatus is the webhooks part of /v1/status.
type WebhookStatus struct {
	Listen      string      `json:"listen"`
	TLS         *CertStatus `json:"tls,omitempty"` // nil: plain HTTP
	Signed      bool        `json:"signature_required"`
	Accepted    int64       `json:"accepted"`
	Forwarded   int64       `json:"forwarded"`
	LastSent    time.Time   `json:"last_forwarded_at,omitempty"`
	LastError   string      `json:"last_error,omitempty"`
	LastErrorAt time.Time   `json:"last_error_at,omitempty"`
	Spool       spool.Stats `json:"spool"`
	OldestAgeS  int64       `json:"oldest_age_seconds"`
}

// CertStatus is a listener's TLS certificate.
type CertStatus struct {
	NotAfter time.Time `json:"not_after"`
	Problem  string    `json:"problem,omitempty"` // renewed files that do not load
}

func (w *webhooks) status() *WebhookStatus {
	st := w.spool.Stats()
	w.mu.Lock()
	defer w.mu.Unlock()
	s := &WebhookStatus{Listen: w.Addr(), Signed: w.config().Secret != nil, Accepted: w.accepted, Forwarded: w.forwarded,
		LastSent: w.lastSent, LastError: w.lastError, LastErrorAt: w.lastErrorAt, Spool: st}
	if !st.Oldest.IsZero() {
		s.OldestAgeS = int64(time.Since(st.Oldest).Seconds())
	}
	if w.cert != nil {
		s.TLS = &CertStatus{NotAfter: w.cert.NotAfter(), Problem: w.cert.Problem()}
	}
	return s
}

// serve runs the listener and the lanes until ctx ends.
func (w *webhooks) serve(ctx context.Context, a *Agent) {
	srv := &http.Server{Handler: w, ReadHeaderTimeout: 10 * time.Second, ReadTimeout: time.Minute, MaxHeaderBytes: 64 << 10,
		ErrorLog: logging.ServerErrorLog(w.log)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(w.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			w.log.Error("webhook listener failed", "err", err)
		}
	}()
	for _, l := range w.lanes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w.runLane(ctx, l, a)
		}()
	}
	if w.cert != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			certfile.Watch(ctx, certfile.CheckEvery, func() { w.checkCert("files changed") })
		}()
	}
	cfg := w.config()
	w.log.Info("webhook listener started", "listen", w.Addr(), "spool", cfg.SpoolDir, "signature_required", cfg.Secret != nil, "tls", w.cert != nil)
	if w.cert != nil {
		w.noteCert("webhook listener's TLS certificate loaded", "start")
	}
	if cfg.Secret == nil {
		w.log.Warn("webhooks.secret_file is not set: unsigned webhook deliveries are accepted from anyone who can reach " + w.Addr())
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	wg.Wait()
}

// config is the webhook settings in force.
func (w *webhooks) config() *config.Webhooks { return w.cfg.Load() }

// reload puts next's secret, body and spool limits in force; keepRestartOnly
// has put back the settings a running listener cannot change.
func (w *webhooks) reload(next config.Webhooks) {
	prev := w.cfg.Swap(&next)
	w.spool.SetLimits(spool.Limits{MaxBytes: int64(next.SpoolMaxMB) << 20, MaxCount: next.SpoolMaxCount})
	if (prev.Secret == nil) != (next.Secret == nil) {
		if next.Secret == nil {
			w.log.Warn("webhooks.secret_file removed by a reload: unsigned webhook deliveries are accepted from anyone who can reach " + w.Addr())
		} else {
			w.log.Info("webhooks.secret_file set by a reload: deliveries must now be signed")
		}
	}
}

// checkCert loads the listener's certificate files again; why says what
// asked (reload, files changed).
func (w *webhooks) checkCert(why string) {
	if w.cert == nil {
		return
	}
	renewed, err := w.cert.Check()
	switch {
	case err != nil:
		w.log.Error("webhook listener's TLS certificate files do not load; still serving the current certificate", "why", why, "err", err)
	case renewed:
		w.noteCert("webhook listener's TLS certificate renewed; new connections get it", why)
	}
}

// noteCert logs the certificate the listener serves, louder as it nears
// its end (certfile.Urgency).
func (w *webhooks) noteCert(msg, why string) {
	na := w.cert.NotAfter()
	level, advice := certfile.Urgency(na)
	if advice != "" {
		msg += "; " + advice
	}
	w.log.Log(context.Background(), level, msg, "why", why, "file", w.cert.CertFile, "not_after", na.UTC().Format(time.RFC3339))
}

// lane is an in-order queue of spooled entries.
type lane struct {
	mu    sync.Mutex
	queue []spool.Entry
	ready chan struct{} // signalled (cap 1) when queue becomes non-empty
}

func newLane() *lane { return &lane{ready: make(chan struct{}, 1)} }

func (l *lane) push(e spool.Entry) {
	l.mu.Lock()
	l.queue = append(l.queue, e)
	l.mu.Unlock()
	select {
	case l.ready <- struct{}{}:
	default:
	}
}

// head returns the first entry, waiting for one until ctx ends.
func (l *lane) head(ctx context.Context) (spool.Entry, bool) {
	for {
		l.mu.Lock()
		if len(l.queue) > 0 {
			e := l.queue[0]
			l.mu.Unlock()
			return e, true
		}
		l.mu.Unlock()
		select {
		case <-l.ready:
		case <-ctx.Done():
			return spool.Entry{}, false
		}
	}
}

func (l *lane) pop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.queue[0] = spool.Entry{}
	l.queue = l.queue[1:]
}

// retryAfter parses a Retry-After in seconds, capped; 0 if absent.
func retryAfter(h http.Header) time.Duration {
	s, err := strconv.Atoi(h.Get("Retry-After"))
	const most = 5 * time.Minute
	switch {
	case err != nil || s <= 0:
		return 0
	case s >= int(most/time.Second): // before multiplying: a huge value would wrap
		return most
	}
	return time.Duration(s) * time.Second
}
