package agent

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/ferry-tunnel/ferry/internal/audit"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/policy"
	"github.com/ferry-tunnel/ferry/proto"
)

// upstream is one configured internal service and its proxy.
type upstream struct {
	cfg       *config.Upstream
	base      *url.URL
	bases     []*url.URL // base and aliases: URLs that mean this upstream
	proxy     *httputil.ReverseProxy
	transport *upstreamTransport
	log       *slog.Logger
	gate      *gate // max_concurrent_requests; shared with the same name's upstream before a reload
}

// upstreamSet is the configured upstreams, replaced whole on reload.
type upstreamSet struct {
	byName map[string]*upstream
	names  []string
}

func newUpstreamSet(cfg *config.Agent, log *slog.Logger, pool *httpx.BufferPool, gs *gates) (*upstreamSet, error) {
	s := &upstreamSet{byName: map[string]*upstream{}}
	bodies := httpx.NewBufferPool(upstreamBodyChunk)
	for i := range cfg.Upstreams {
		u, err := newUpstream(&cfg.Upstreams[i], cfg.Timeouts, log, pool, bodies)
		if err != nil {
			return nil, err
		}
		u.gate = gs.get(u.cfg.Name)
		s.byName[u.cfg.Name] = u
		s.names = append(s.names, u.cfg.Name)
	}
	return s, nil
}

// applyLimits puts the set's max_concurrent_requests in force; called
// once the set is the one in use, so a refused reload changes nothing.
func (s *upstreamSet) applyLimits() {
	for _, u := range s.byName {
		u.gate.setLimit(u.cfg.MaxConcurrentRequests)
	}
}

func (s *upstreamSet) closeIdle() {
	for _, u := range s.byName {
		u.transport.CloseIdleConnections()
	}
}

// forward is what ServeHTTP decided, carried to the proxy's Rewrite.
type forward struct {
	path       string // canonical, checked path
	auth       string // Authorization header value for the upstream
	publicBase string // the scanner's URL of this upstream, for rewriting responses
}

type forwardKey struct{}

// upstreamIdleConns is how many idle connections the agent keeps to each
// upstream for requests without a body, and as many for those with one
// (upstreamTransport); each costs the upstream a socket and both ends
// ~40 KiB.
const upstreamIdleConns = 128

// upstreamBodyChunk is the largest piece of a request body sent to an
// upstream in one write (and one syscall); a buffer of it is held only
// while a body is being sent.
const upstreamBodyChunk = 256 << 10

func newUpstream(cfg *config.Upstream, t config.AgentTimeouts, log *slog.Logger, pool, bodies *httpx.BufferPool) (*upstream, error) {
	base, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", cfg.Name, err)
	}
	u := &upstream{cfg: cfg, base: base, bases: []*url.URL{base}, log: log.With("upstream", cfg.Name)}
	for _, a := range cfg.Aliases {
		au, err := url.Parse(a)
		if err != nil {
			return nil, fmt.Errorf("upstream %s alias: %w", cfg.Name, err)
		}
		u.bases = append(u.bases, au)
	}
	dial := httpx.IdleDialer(&net.Dialer{Timeout: t.Dial, KeepAlive: 30 * time.Second}, max(t.Idle, cfg.ResponseTimeout))
	fallback := &http.Transport{
		Proxy:       nil, // upstreams are internal; HTTPS_PROXY is for the relay only
		DialContext: dial,
		// https upstreams: the transport's TLS, but request bodies leave
		// in large writes (see upstreamTLSDialer). TLS 1.2+, no ALPN:
		// HTTP/1.1, as the transport would speak with a custom dialer.
		DialTLSContext:        upstreamTLSDialer(dial, &tls.Config{RootCAs: cfg.CA, MinVersion: tls.VersionTLS12}, t.TLSHandshake, bodies),
		ResponseHeaderTimeout: cfg.ResponseTimeout,
		ExpectContinueTimeout: time.Second,
		// Scanners send tens of requests at once: an idle pool smaller than
		// that closes connections only to dial them again, a TLS handshake
		// per request (at 64 concurrent GETs, a third of the agent's CPU).
		MaxIdleConns:           upstreamIdleConns,
		MaxIdleConnsPerHost:    upstreamIdleConns,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 64 << 10,
		DisableCompression:     true, // pass the scanner's Accept-Encoding through as is
	}
	u.transport = newUpstreamTransport(fallback, base)
	u.proxy = &httputil.ReverseProxy{
		Rewrite:   u.rewrite,
		Transport: u.transport,
		// 0: see the relay's proxy; streams of unknown length flush at once.
		FlushInterval:  0,
		BufferPool:     pool,
		ErrorHandler:   u.proxyError,
		ModifyResponse: u.modifyResponse,
		ErrorLog:       logging.ServerErrorLog(log),
	}
	return u, nil
}

func (u *upstream) rewrite(pr *httputil.ProxyRequest) {
	f := pr.In.Context().Value(forwardKey{}).(*forward)
	pr.Out.URL = &url.URL{
		Scheme:   u.base.Scheme,
		Host:     u.base.Host,
		Path:     u.base.Path + f.path,
		RawQuery: pr.In.URL.RawQuery,
	}
	pr.Out.Host = u.base.Host
	for k := range pr.Out.Header {
		if dropRequestHeader(strings.ToLower(k)) {
			delete(pr.Out.Header, k)
		}
	}
	pr.Out.Header.Set("Authorization", f.auth)
}

// dropRequestHeader: credentials and identity claims from the far side,
// and method overrides that would let a GET act as a DELETE.
func dropRequestHeader(k string) bool {
	switch k {
	case "authorization", "proxy-authorization", "cookie",
		"x-http-method-override", "x-http-method", "x-method-override":
		return true
	}
	return httpx.IsForwardingHeader(k) || strings.HasPrefix(k, "x-ferry-") || strings.HasPrefix(k, "x-ausername")
}

// authHeader builds the upstream credential, re-read if its file changed.
func (u *upstream) authHeader() (string, error) {
	v, err := u.cfg.Auth.Secret.Value()
	if err != nil {
		return "", err
	}
	if u.cfg.Auth.Type == "basic" {
		return "Basic " + base64.StdEncoding.EncodeToString([]byte(u.cfg.Auth.Username+":"+v)), nil
	}
	return "Bearer " + v, nil
}

func (u *upstream) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	rid := w.Header().Get(httperr.RequestIDHeader)
	switch {
	case errors.Is(r.Context().Err(), context.Canceled):
		u.log.Info("request cancelled by the relay side", "request_id", rid, "err", err)
		return
	case httpx.IsTimeout(err):
		u.log.Warn("upstream timed out", "request_id", rid, "err", err)
		httperr.Respond(w, r, http.StatusGatewayTimeout, httperr.UpstreamTimeout, "upstream "+u.cfg.Name+" did not answer in time")
		return
	}
	if outOfDescriptors(err) {
		// The agent's own limit, not the upstream: say so loudly.
		u.log.Error("upstream request failed: the agent is out of file descriptors (raise LimitNOFILE)", "request_id", rid, "err", err)
	} else {
		u.log.Warn("upstream request failed", "request_id", rid, "err", err)
	}
	httperr.Respond(w, r, http.StatusBadGateway, httperr.UpstreamError, "upstream "+u.cfg.Name+": "+classify(err)+" (details in the agent log)")
}

// classify says what kind of failure err is without naming internal hosts.
func classify(err error) string {
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var op *net.OpError
	var dns *net.DNSError
	switch {
	case outOfDescriptors(err):
		return "the agent is out of file descriptors"
	case errors.Is(err, errOffHostRedirect):
		return "it redirected to another host, which ferry does not follow"
	case errors.As(err, &cv), errors.As(err, &ua), errors.As(err, &hn):
		return "TLS certificate not trusted (check the upstream's ca_file)"
	case errors.As(err, &dns):
		return "host name does not resolve"
	case errors.As(err, &op) && op.Op == "dial":
		return "cannot connect"
	}
	return "request failed"
}

// outOfDescriptors: the process or the system has no file descriptor
// left for a new connection.
func outOfDescriptors(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}

// ServeHTTP serves one request arriving through the tunnel: judge it,
// then forward it to its upstream with the upstream's credential.
func (a *Agent) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	hdr, hdrErr := requestHeader(r)
	// The relay closes its end when the scanner goes away; the server sees
	// EOF and cancels the request. yamux has no reset, and a write blocked
	// on a full window would wait forever for a reader that left: closing
	// the stream wakes it. Deregistered before a normal return, so a
	// finished response is never cut.
	if tc := connFrom(r.Context()); tc != nil {
		stop := context.AfterFunc(r.Context(), func() { tc.Stream.Close() })
		defer stop()
		if !tc.keepAlive {
			// One request per stream, as the relay that opened it expects.
			w.Header().Set("Connection", "close")
		}
	}
	rid := hdr.RequestID
	if !httperr.ValidRequestID(rid) {
		rid = httperr.NewRequestID()
	}
	w.Header().Set(httperr.RequestIDHeader, rid)
	rec := &httpx.Recorder{ResponseWriter: w}
	in := &httpx.CountingBody{ReadCloser: r.Body}
	// On a copy: the server must keep its own body to handle "Expect:
	// 100-continue" after a refusal (see the relay's handler).
	r = r.WithContext(r.Context())
	r.Body = in
	a.metrics.StreamsInFlight.Inc()
	a.inflight.Add(1)
	defer func() {
		a.inflight.Add(-1)
		a.metrics.StreamsInFlight.Dec()
	}()
	entry := audit.Entry{RequestID: rid, Scanner: hdr.Scanner, Upstream: hdr.Upstream, Method: r.Method, Decision: "deny"}
	defer func() {
		took := time.Since(start)
		entry.Time, entry.Status, entry.Bytes = start.UTC(), rec.StatusCode(), rec.Bytes
		entry.DurationMS = took.Milliseconds()
		// Counted before the answer leaves, so a scanner holding its
		// answer finds it in /metrics and on the status page; logged and
		// audited after, so a slow log destination never holds it up.
		a.count(entry, took, in.N())
		rec.SendIfComplete()
		a.logAndAudit(entry)
	}()

	rawPath, rawQuery, _ := strings.Cut(r.RequestURI, "?")
	entry.Path = rawPath
	u := a.upstreams().byName[hdr.Upstream]
	switch {
	case hdrErr != nil:
		entry.Rule = "stream-header"
		a.log.Warn("request from the relay without a valid header; refused", "request_id", rid, "err", hdrErr)
		httperr.Respond(rec, r, http.StatusBadRequest, httperr.BadRequest, "the relay sent this request without a valid "+proto.StreamHeaderField+" header")
		return
	case u == nil:
		entry.Rule = "unknown-upstream"
		httperr.Respond(rec, r, http.StatusNotFound, httperr.UnknownUpstream, fmt.Sprintf("this agent has no upstream %q", hdr.Upstream))
		return
	case !strings.HasPrefix(rawPath, "/"):
		entry.Rule = "normalise"
		httperr.Respond(rec, r, http.StatusBadRequest, httperr.BadRequest, "request target must be a path")
		return
	case r.Header.Get("Upgrade") != "":
		entry.Rule = "upgrade"
		httperr.Respond(rec, r, http.StatusBadRequest, httperr.BadRequest, "protocol upgrades are not forwarded")
		return
	}
	if why := policy.CheckHeaders(r.Header); why != "" {
		entry.Rule = "headers"
		httperr.Respond(rec, r, http.StatusBadRequest, httperr.BadRequest, why)
		return
	}
	d := u.cfg.Policy.Decide(r.Method, rawPath, rawQuery)
	entry.Rule = d.Rule
	if d.Path != "" {
		entry.Path = d.Path
	}
	if !d.Allow {
		writeRefusal(rec, r, d.Status, d.Reason)
		return
	}
	if d.Inspect != policy.InspectNone {
		body, err := u.cfg.Policy.CheckBody(d, r.Header, r.Body)
		var ref *policy.Refusal
		switch {
		case errors.As(err, &ref):
			entry.Rule = ref.Rule
			if ref.Push != nil && httpx.IsGit(r) && writePushRejection(rec, ref.Push, ref.Reason, u.cfg.Policy.PushRefPrefix()) {
				return
			}
			writeRefusal(rec, r, ref.Status, ref.Reason)
			return
		case err != nil:
			entry.Rule = "body"
			httperr.Respond(rec, r, http.StatusBadRequest, httperr.BadRequest, "could not read the request body: "+err.Error())
			return
		}
		r.Body = readCloser{body.R, r.Body}
		if body.Decoded {
			r.Header.Del("Content-Encoding")
			r.Header.Del("Content-Length")
			r.ContentLength = -1
		}
	}
	auth, err := u.authHeader()
	if err != nil {
		entry.Rule = "credential"
		a.log.Error("cannot read upstream credential", "upstream", u.cfg.Name, "request_id", rid, "err", err)
		httperr.Respond(rec, r, http.StatusBadGateway, httperr.UpstreamError, "the agent cannot read its credential for upstream "+u.cfg.Name)
		return
	}
	entry.Decision = "allow"
	fwd := &forward{path: d.Path, auth: auth, publicBase: parsePublicBase(r.Header.Get(PublicBaseHeader))}
	ctx := context.WithValue(r.Context(), forwardKey{}, fwd)
	if !hdr.Deadline.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, hdr.Deadline)
		defer cancel()
	}
	if !a.admit(ctx, rec, r, u, &entry) {
		return
	}
	defer u.gate.release()
	u.proxy.ServeHTTP(rec, r.WithContext(ctx))
	a.closeIdleIfReplaced(u)
}

// closeIdleIfReplaced closes the idle connections of u's transport if a
// reload replaced u while it was in use. The reload closed the idle ones
// (and net/http closes those going idle later, but only until the
// transport's next request): a request sent on u after the reload, such
// as one admitted by u's gate or a credential check's second, would
// leave its connection open to the upstream for the idle timeout (90 s).
func (a *Agent) closeIdleIfReplaced(u *upstream) {
	if a.upstreams().byName[u.cfg.Name] != u {
		u.transport.CloseIdleConnections()
	}
}

// admit takes one of the upstream's max_concurrent_requests slots,
// waiting up to max_queue_wait (or the request's deadline) in arrival
// order. It answers 503 upstream_busy, and reports false, when none came
// free; a request that took a slot must release it.
func (a *Agent) admit(ctx context.Context, w http.ResponseWriter, r *http.Request, u *upstream, entry *audit.Entry) bool {
	err := u.gate.acquire(ctx, u.cfg.MaxQueueWait)
	if err == nil {
		return true
	}
	name := u.cfg.Name
	limit := u.gate.load(name).Limit
	entry.Decision, entry.Rule = "deny", "max_concurrent_requests"
	if errors.Is(err, errGateTimeout) {
		a.log.Warn("upstream at its max_concurrent_requests; request refused after waiting", "upstream", name, "limit", limit,
			"waited", u.cfg.MaxQueueWait.String(), "request_id", entry.RequestID)
	} // else the scanner left, or its deadline passed, while waiting: the answer goes nowhere
	w.Header().Set("Retry-After", "5")
	httperr.Respond(w, r, http.StatusServiceUnavailable, httperr.UpstreamBusy,
		fmt.Sprintf("upstream %s is at this agent's limit of %d requests at once (upstreams[].max_concurrent_requests); none finished within %s, retry later", name, limit, u.cfg.MaxQueueWait))
	return false
}

// readCloser forwards a checked body while closing the original.
type readCloser struct {
	io.Reader
	io.Closer
}

// writeRefusal answers a policy refusal.
func writeRefusal(w http.ResponseWriter, r *http.Request, status int, reason string) {
	code := httperr.PolicyDenied
	if status == http.StatusBadRequest {
		code = httperr.BadRequest
	}
	httperr.Respond(w, r, status, code, reason)
}

// count adds a finished request to the metrics and the status page's
// figures: memory only, nothing that can wait.
func (a *Agent) count(e audit.Entry, took time.Duration, bytesIn int64) {
	up := "-" // the relay names the upstream: only configured names become labels
	if a.upstreams().byName[e.Upstream] != nil {
		up = e.Upstream
	}
	m := a.metrics
	m.Requests.WithLabelValues(up, metrics.MethodClass(e.Method), metrics.Code(e.Status), e.Decision).Inc()
	m.RequestDuration.WithLabelValues(up, e.Decision).Observe(took.Seconds())
	m.Bytes.WithLabelValues(up, "to_upstream").Add(float64(bytesIn))
	m.Bytes.WithLabelValues(up, "to_relay").Add(float64(e.Bytes))
	if e.Decision == "deny" {
		m.PolicyDenials.WithLabelValues(up, e.Rule).Inc()
		shown := e // the page's copy is shortened; the audit log keeps the whole path
		shown.Path = httpx.Truncate(e.Path, 200)
		a.denials.Add(shown)
	}
	a.stats.record(e)
}

// logAndAudit writes a finished request's log line and audit record.
func (a *Agent) logAndAudit(e audit.Entry) {
	a.log.Info("request", "request_id", e.RequestID, "scanner", e.Scanner, "upstream", e.Upstream, "method", e.Method,
		"path", e.Path, "decision", e.Decision, "rule", e.Rule, "status", e.Status, "bytes", e.Bytes, "duration_ms", e.DurationMS)
	if err := a.audit.Record(e); err != nil {
		a.metrics.AuditLost.Inc()
		a.log.Error("audit log write failed; this decision is not in the audit log", "request_id", e.RequestID, "err", err)
	}
}
