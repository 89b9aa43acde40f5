package relay

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/policy"
	"github.com/ferry-tunnel/ferry/internal/token"
	"github.com/ferry-tunnel/ferry/proto"
)

const (
	// maxRequestDuration is sent to the agent as the request's deadline.
	maxRequestDuration = 2 * time.Hour
	streamHeaderWrite  = 10 * time.Second
	maxRequestURI      = 8 << 10
)

// errTunnelOffline: no live agent connection could take the request.
var errTunnelOffline = errors.New("no agent connection")

// route is what the scanner handler decided, carried to the dialer in the
// request context.
type route struct {
	tunnel     *tunnel
	conn       *agentConn
	rawPath    string // path below /t/{tunnel}/{upstream}, as received
	header     proto.Header
	publicBase string // the scanner's URL of the upstream, for the agent's rewrites
}

type routeKey struct{}

func withRoute(ctx context.Context, rt *route) context.Context {
	return context.WithValue(ctx, routeKey{}, rt)
}

func routeFrom(ctx context.Context) *route {
	rt, _ := ctx.Value(routeKey{}).(*route)
	return rt
}

// newProxy builds the reverse proxy that carries scanner requests into the
// tunnel: one yamux stream per request, HTTP/1.1 on it, streamed.
func (r *Relay) newProxy() *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			rt := routeFrom(pr.In.Context())
			// Opaque keeps the path exactly as the scanner sent it; the agent
			// normalises and judges it. Paths starting "//" never get here.
			pr.Out.URL = &url.URL{Scheme: "http", Host: "agent.ferry", Opaque: rt.rawPath, RawQuery: pr.In.URL.RawQuery}
			pr.Out.Host = "agent.ferry"
			stripScannerHeaders(pr.Out.Header)
			pr.Out.Header.Set("X-Ferry-Public-Base", rt.publicBase)
			// The request's own header (request id included), for a
			// keep-alive stream; an agent that does not use it drops it
			// with the other X-Ferry-* fields and reads the stream's.
			if v, err := rt.header.FieldValue(); err == nil {
				pr.Out.Header[proto.StreamHeaderField] = []string{v}
			}
		},
		Transport: tunnelTransport{r: r},
		// 0: responses of unknown length (git's streams) are flushed at
		// once by ReverseProxy anyway; known-length ones need no flush per
		// write, which would cost a frame (and a syscall) each.
		FlushInterval: 0,
		BufferPool:    r.copyBuffers,
		ErrorHandler:  r.proxyError,
		ModifyResponse: func(resp *http.Response) error {
			resp.Header.Del(httperr.RequestIDHeader) // the relay set its own, same value
			return nil
		},
		ErrorLog: logging.ServerErrorLog(r.log),
	}
}

// stripScannerHeaders removes what must not cross the tunnel: the
// scanner's credentials and anything that claims to say who is asking.
func stripScannerHeaders(h http.Header) {
	for k := range h {
		lk := strings.ToLower(k)
		if lk == "authorization" || lk == "proxy-authorization" || lk == "cookie" ||
			httpx.IsForwardingHeader(lk) || strings.HasPrefix(lk, "x-ferry-") {
			delete(h, k)
		}
	}
}

// openStream opens a stream for one request on the connection the
// handler picked, or on another live one if that connection just died or
// began to drain, and counts the request in flight on it.
func (r *Relay) openStream(rt *route) (*trackedStream, error) {
	c := rt.conn
	for attempt := 0; ; attempt++ {
		s, err := c.openStream()
		if err == nil {
			if id := s.StreamID(); id >= r.retireStreamID && !c.retiring.Load() &&
				(id >= r.forceRetireStreamID || rt.tunnel.pick(c) != nil) {
				r.retire(c)
			}
			t := r.track(c, s)
			t.begin()
			return t, nil
		}
		if errors.Is(err, yamux.ErrStreamsExhausted) {
			r.retire(c)
		}
		if attempt > 0 {
			return nil, fmt.Errorf("%w: open stream: %v", errTunnelOffline, err)
		}
		if c = rt.tunnel.pick(c); c == nil {
			return nil, fmt.Errorf("%w: open stream: %v", errTunnelOffline, err)
		}
		rt.conn = c
	}
}

// A connection that has opened a stream with id retireStreamID is asked
// to go away. yamux's stream ids are 32 bits and never reused: a
// connection that opened a stream per request for months (2^31 of them at
// most) would refuse every new stream. The agent dials a fresh one at
// once; this one finishes its streams. It is asked once another
// connection of the tunnel takes requests, so that none are refused
// meanwhile, and past forceRetireStreamID even if none does.
const (
	retireStreamID      = math.MaxUint32 - 1<<28
	forceRetireStreamID = math.MaxUint32 - 1<<27
	// retireGrace: a retired connection the agent has not closed by then
	// (its streams long finished: the agent's drain is 30 s) is cut.
	retireGrace = time.Hour
)

// retire asks c, once, to go away because its stream ids are running out.
func (r *Relay) retire(c *agentConn) {
	if !c.retiring.CompareAndSwap(false, true) {
		return
	}
	r.log.Info("agent connection has used most of its stream ids; asking the agent to open a fresh one", "tunnel", c.tunnel.id, "connection_id", c.id,
		"agent_id", c.agentID, "served", c.served.Load())
	c.goAway(proto.GoAwayStreamIDs)
	c.retireCut.Store(time.AfterFunc(r.retireGrace, func() { c.sess.Close() }))
	if c.sess.IsClosed() { // ended before the timer was stored: finish may have missed it
		c.retireCut.Load().Stop()
	}
}

// pooledStream takes an idle keep-alive stream of the route's connection
// for one request, or returns nil.
func (r *Relay) pooledStream(rt *route) *trackedStream {
	if !rt.conn.keepAlive {
		return nil
	}
	t := rt.conn.pool.get()
	if t != nil {
		t.begin()
	}
	return t
}

// streamIdle is how long a request's stream may be silent once the
// response head has come.
func (r *Relay) streamIdle() time.Duration {
	t := r.tmo()
	return max(t.Idle, t.AgentResponse)
}

func (r *Relay) track(c *agentConn, s *yamux.Stream) *trackedStream {
	return &trackedStream{Stream: s, conn: c, idle: r.streamIdle(), buffers: r.copyBuffers,
		inflight: r.metrics.StreamsInFlight.WithLabelValues(c.tunnel.id)}
}

// trackedStream is a stream to an agent. It counts a request in flight
// from begin until end or Close (a keep-alive stream carries several, one
// at a time), and cuts the stream when the agent sends nothing for idle.
type trackedStream struct {
	*yamux.Stream
	conn     *agentConn
	idle     time.Duration // read only by the goroutine reading the stream
	got      int64         // bytes read since begin, by that goroutine
	buffers  *httpx.BufferPool
	inflight prometheus.Gauge
	busy     atomic.Bool
}

func (t *trackedStream) begin() {
	t.got = 0
	t.busy.Store(true)
	t.conn.inflight.Add(1)
	t.conn.served.Add(1)
	t.inflight.Inc()
}

// end counts the stream's request as over; it may run more than once.
func (t *trackedStream) end() {
	if t.busy.CompareAndSwap(true, false) {
		t.conn.inflight.Add(-1)
		t.inflight.Dec()
	}
}

func (t *trackedStream) setIdle(d time.Duration) { t.idle = d }

func (t *trackedStream) Read(p []byte) (int, error) {
	t.Stream.SetReadDeadline(time.Now().Add(t.idle))
	n, err := t.Stream.Read(p)
	t.got += int64(n)
	return n, err
}

// ReadFrom sends a request body in writes of up to 128 KiB: each write
// is a yamux frame and a hand-off to the session's send loop, and
// Request.Write would otherwise write through a 4 KiB buffer.
func (t *trackedStream) ReadFrom(r io.Reader) (int64, error) {
	buf := t.buffers.Get()
	defer t.buffers.Put(buf)
	return io.CopyBuffer(t.Stream, r, buf)
}

func (t *trackedStream) Close() error {
	t.end()
	return t.Stream.Close()
}

// serveScanner is the scanner API: /t/{tunnel}/{upstream}/{path}.
func (r *Relay) serveScanner(w http.ResponseWriter, req *http.Request) {
	r.serveTunnelRequest(w, req, false)
}

// servePeer is the internal listener: the same requests, forwarded by
// another replica that authenticated the scanner, authenticated here by
// the peer secret. They are never forwarded again.
func (r *Relay) servePeer(w http.ResponseWriter, req *http.Request) {
	r.serveTunnelRequest(w, req, true)
}

func (r *Relay) serveTunnelRequest(w http.ResponseWriter, req *http.Request, peer bool) {
	start := time.Now()
	rid := httperr.NewRequestID()
	if peer {
		if id := req.Header.Get(httperr.RequestIDHeader); httperr.ValidRequestID(id) {
			rid = id
		}
	}
	w.Header().Set(httperr.RequestIDHeader, rid)
	// A scanner that stops reading the response, or stops sending its
	// body, for timeouts.idle is cut. The deadlines are cleared when the
	// handler returns, before the connection serves its next request.
	rc := http.NewResponseController(w)
	idle := r.tmo().Idle
	defer rc.SetWriteDeadline(time.Time{})
	defer rc.SetReadDeadline(time.Time{})
	rec := &httpx.Recorder{ResponseWriter: &httpx.IdleWriter{ResponseWriter: w, RC: rc, Idle: idle}}
	w = rec
	in := &httpx.CountingBody{ReadCloser: &httpx.IdleBody{ReadCloser: req.Body, RC: rc, Idle: idle}}
	// On a copy: the server must still see its own body, or it reads a
	// body nobody asked for ("Expect: 100-continue") after a refusal,
	// and the scanner waits for a 100 that never comes.
	req = req.WithContext(req.Context())
	req.Body = in
	var tunnelID, upstream, scanner string
	via := "" // "peer": forwarded to this replica; "forwarded": sent on to another
	// Metric labels take only configured tunnels and upstreams the agent
	// announced: path segments are the scanner's to choose.
	mTunnel, mUpstream := "-", "-"
	defer func() {
		// Counted before the answer leaves, so a scanner holding its
		// answer finds it in /metrics and on the status page; logged
		// after, so a slow log destination never holds it up.
		status, took := rec.StatusCode(), time.Since(start)
		r.requests.Add(1)
		if status >= 400 {
			if status >= 500 {
				r.failed.Add(1)
			} else {
				r.refused.Add(1)
			}
			r.recent.Add(ErrorEvent{Time: start, RequestID: rid, Tunnel: tunnelID, Scanner: scanner, Method: req.Method,
				Path: httpx.Truncate(pathOnly(req.RequestURI), 200), Status: status, Code: rec.Header().Get("X-Ferry-Error")})
		}
		m := r.metrics
		if mTunnel != "-" && r.auth.Load().tunnels[mTunnel] == nil {
			mTunnel = "-" // removed meanwhile by a reload, which dropped its series
		}
		m.Requests.WithLabelValues(mTunnel, mUpstream, metrics.MethodClass(req.Method), metrics.Code(status)).Inc()
		m.RequestDuration.WithLabelValues(mTunnel).Observe(took.Seconds())
		m.Bytes.WithLabelValues(mTunnel, "to_agent").Add(float64(in.N()))
		m.Bytes.WithLabelValues(mTunnel, "to_scanner").Add(float64(rec.Bytes))
		rec.SendIfComplete()
		r.log.Info("scanner request", "request_id", rid, "scanner", scanner, "tunnel", tunnelID, "upstream", upstream,
			"method", req.Method, "path", pathOnly(req.RequestURI), "status", status, "bytes", rec.Bytes,
			"duration_ms", took.Milliseconds(), "via", via)
	}()

	if len(req.RequestURI) > maxRequestURI {
		httperr.Respond(w, req, http.StatusRequestURITooLong, httperr.BadRequest, fmt.Sprintf("request URI longer than %d bytes", maxRequestURI))
		return
	}
	if len(req.Header) > policy.MaxHeaderFields {
		httperr.Respond(w, req, http.StatusRequestHeaderFieldsTooLarge, httperr.BadRequest, fmt.Sprintf("more than %d header fields", policy.MaxHeaderFields))
		return
	}
	tunnelID, upstream, rest, ok := splitScannerPath(req.RequestURI)
	if !ok {
		httperr.Respond(w, req, http.StatusNotFound, httperr.NotFound, "scanner URLs have the form /t/{tunnel}/{upstream}/{path}")
		return
	}
	sc, ok := r.authRequest(w, req, peer)
	if !ok {
		return
	}
	if peer {
		via = "peer"
	}
	scanner = sc.name
	auth := r.auth.Load()
	t := auth.tunnels[tunnelID]
	if t != nil {
		mTunnel = tunnelID
	}
	if t == nil {
		httperr.Respond(w, req, http.StatusNotFound, httperr.UnknownTunnel, fmt.Sprintf("no tunnel %q on this relay", tunnelID))
		return
	}
	if !sc.tunnels[tunnelID] {
		httperr.Respond(w, req, http.StatusForbidden, httperr.Forbidden, fmt.Sprintf("scanner %q may not use tunnel %q", sc.name, tunnelID))
		return
	}
	if strings.HasPrefix(rest, "//") {
		httperr.Respond(w, req, http.StatusBadRequest, httperr.BadRequest, "ambiguous path: empty segment (//)")
		return
	}
	if req.Header.Get("Upgrade") != "" {
		httperr.Respond(w, req, http.StatusBadRequest, httperr.BadRequest, "protocol upgrades are not supported through ferry")
		return
	}
	// Reserve slots first: check and count are one atomic step. The
	// scanner's own limit first, so that a scanner over it does not take
	// the tunnel's slots from the others, even for a moment.
	if n := sc.load.requests.Add(1); sc.maxStreams > 0 && n > sc.maxStreams {
		sc.load.requests.Add(-1)
		sc.load.overLimit.Add(1)
		r.metrics.ScannerOverLimit.WithLabelValues(sc.name).Inc()
		w.Header().Set("Retry-After", "1")
		httperr.Respond(w, req, http.StatusTooManyRequests, httperr.TooManyRequests,
			fmt.Sprintf("scanner %q has %d requests in flight on this relay, its limit (scanners[].max_streams); retry shortly", sc.name, sc.maxStreams))
		return
	}
	defer sc.load.requests.Add(-1)
	if n := t.requests.Add(1); n > auth.maxStreams {
		t.requests.Add(-1)
		w.Header().Set("Retry-After", "1")
		httperr.Respond(w, req, http.StatusServiceUnavailable, httperr.TunnelBusy,
			fmt.Sprintf("tunnel %q has %d requests in flight, its limit; retry shortly", tunnelID, auth.maxStreams))
		return
	}
	defer t.requests.Add(-1)
	scheme := "http"
	if req.TLS != nil {
		scheme = "https"
	}
	publicBase := scheme + "://" + req.Host + "/t/" + tunnelID + "/" + upstream
	if pb := req.Header.Get(hdrPublicBase); peer && pb != "" {
		publicBase = pb
	}
	c := t.pick(nil)
	if c == nil {
		why := ""
		if !peer {
			var forwarded bool
			if forwarded, why = r.forwardToPeer(w, req, tunnelID, sc.name, rid, publicBase); forwarded {
				via = "forwarded"
				return
			}
		}
		if why == "" {
			why = fmt.Sprintf("no agent is connected for tunnel %q", tunnelID)
		}
		httperr.Respond(w, req, http.StatusServiceUnavailable, httperr.TunnelOffline, why)
		return
	}
	if !c.serves(upstream) {
		httperr.Respond(w, req, http.StatusNotFound, httperr.UnknownUpstream, fmt.Sprintf("the agent of tunnel %q has no upstream %q", tunnelID, upstream))
		return
	}
	mUpstream = upstream
	rt := &route{tunnel: t, conn: c, rawPath: rest, publicBase: publicBase, header: proto.Header{
		Kind: proto.KindHTTP, Upstream: upstream, RequestID: rid, Scanner: sc.name,
		Deadline: time.Now().Add(maxRequestDuration),
	}}
	r.proxy.ServeHTTP(w, req.WithContext(withRoute(req.Context(), rt)))
}

// authRequest authenticates a scanner (token, with a rate limit on
// failures) or, on the internal listener, the forwarding peer and the
// scanner it vouches for. On false the answer is written.
func (r *Relay) authRequest(w http.ResponseWriter, req *http.Request, peer bool) (*scannerAuth, bool) {
	if peer {
		if !r.checkPeer(req) {
			r.metrics.AuthFailures.WithLabelValues("peer").Inc()
			r.log.Warn("internal listener: request without the peer secret refused", "remote", req.RemoteAddr)
			w.Header().Set(hdrPeerRefused, "secret") // the forwarding replica tells its scanner what went wrong
			httperr.Respond(w, req, http.StatusUnauthorized, httperr.Unauthorized, "peer secret missing or not accepted")
			return nil, false
		}
		sc := r.auth.Load().scannerByName[req.Header.Get(hdrScanner)]
		if sc == nil {
			httperr.Respond(w, req, http.StatusForbidden, httperr.Forbidden, "the forwarding replica named a scanner this replica does not know (replica configs differ?)")
			return nil, false
		}
		return sc, true
	}
	src := sourceOf(req.RemoteAddr)
	if lim, retry := r.limiter.limited(src); lim {
		r.metrics.RateLimited.WithLabelValues("scanner").Inc()
		w.Header().Set("Retry-After", strconv.Itoa(int(retry.Seconds())+1))
		httperr.Respond(w, req, http.StatusTooManyRequests, httperr.TooManyRequests, "too many failed authentications from this address; retry later")
		return nil, false
	}
	sc := r.authScanner(req)
	if sc == nil {
		r.limiter.failed(src)
		r.metrics.AuthFailures.WithLabelValues("scanner").Inc()
		// Basic too, so that git sends a token given in the URL
		// (https://x-token:TOKEN@relay/...) after this challenge.
		w.Header().Add("WWW-Authenticate", `Bearer realm="ferry"`)
		w.Header().Add("WWW-Authenticate", `Basic realm="ferry"`)
		httperr.Respond(w, req, http.StatusUnauthorized, httperr.Unauthorized, "scanner token missing or not accepted")
		return nil, false
	}
	return sc, true
}

// proxyError answers a request the tunnel could not carry.
func (r *Relay) proxyError(w http.ResponseWriter, req *http.Request, err error) {
	rid := w.Header().Get(httperr.RequestIDHeader)
	switch {
	case errors.Is(err, errTunnelOffline):
		httperr.Respond(w, req, http.StatusServiceUnavailable, httperr.TunnelOffline, "the agent connection went away; retry")
	case req.Context().Err() != nil:
		r.log.Info("scanner went away", "request_id", rid, "err", err)
	case httpx.IsTimeout(err):
		httperr.Respond(w, req, http.StatusGatewayTimeout, httperr.UpstreamTimeout, "the agent did not answer in time")
	default:
		r.log.Warn("tunnel request failed", "request_id", rid, "err", err)
		httperr.Respond(w, req, http.StatusBadGateway, httperr.UpstreamError, "the tunnel failed during the request")
	}
}

// splitScannerPath splits a raw request URI "/t/{tunnel}/{upstream}/rest?q"
// into its parts; rest keeps its leading slash and its encoding.
func splitScannerPath(uri string) (tunnel, upstream, rest string, ok bool) {
	p := pathOnly(uri)
	after, found := strings.CutPrefix(p, "/t/")
	if !found {
		return "", "", "", false
	}
	parts := strings.SplitN(after, "/", 3)
	if len(parts) < 2 || !nameRE.MatchString(parts[0]) || !nameRE.MatchString(parts[1]) {
		return "", "", "", false
	}
	rest = "/"
	if len(parts) == 3 {
		rest += parts[2]
	}
	return parts[0], parts[1], rest, true
}

func pathOnly(uri string) string {
	p, _, _ := strings.Cut(uri, "?")
	return p
}

// scannerAuth is a configured scanner, ready for lookups.
type scannerAuth struct {
	name    string
	tunnels map[string]bool
	// maxStreams is scanners[].max_streams (0: none).
	maxStreams int64
	load       *scannerLoad // shared across reloads
}

// scannerLoad counts a scanner's requests on this relay.
type scannerLoad struct {
	requests  atomic.Int64 // in flight
	overLimit atomic.Int64 // refused 429 over max_streams, since start
}

// authScanner accepts "Authorization: Bearer <token>", and Basic with the
// token as password (what git sends for https://x:TOKEN@host/ URLs).
func (r *Relay) authScanner(req *http.Request) *scannerAuth {
	tok, ok := bearerToken(req)
	if !ok {
		if _, pw, basic := req.BasicAuth(); basic && pw != "" {
			tok, ok = pw, true
		}
	}
	if !ok {
		return nil
	}
	a := r.auth.Load()
	if i := token.Index(a.scannerHashes, token.Of(tok)); i >= 0 {
		return a.scanners[i]
	}
	return nil
}
