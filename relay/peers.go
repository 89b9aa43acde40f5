package relay

import (
	"context"
	"crypto/subtle"
	"errors"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"time"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/registry"
)

// Headers a replica sets when it forwards a scanner request to the
// replica holding the tunnel. They are trusted only on the internal
// listener, after the peer secret was checked; scanners' own X-Ferry-*
// headers are stripped everywhere.
const (
	hdrHop        = "X-Ferry-Hop"
	hdrScanner    = "X-Ferry-Scanner"
	hdrPublicBase = "X-Ferry-Public-Base"
	// hdrPeerRefused marks the internal listener's refusal of a peer
	// secret, told apart from a 401 that Bitbucket answered.
	hdrPeerRefused = "X-Ferry-Peer-Refused"
)

// errPeerRefused: the replica holding the tunnel did not accept this
// one's peer secret.
var errPeerRefused = errors.New("the replica holding the tunnel refused this replica's peer secret")

// peerRoute is where the scanner handler decided to forward a request.
type peerRoute struct {
	target     *url.URL
	scanner    string
	rid        string
	publicBase string
	secret     string
}

type peerRouteKey struct{}

// peerProxy carries a scanner request to another replica, streaming
// both ways, one hop only (the receiving replica never forwards again).
type peerProxy struct {
	rp *httputil.ReverseProxy
	tr *http.Transport
}

// newPeerProxy builds a peerProxy that waits for the other replica's
// response head a little longer than that replica waits for its agent's.
func (r *Relay) newPeerProxy(agentResponse time.Duration) *peerProxy {
	tr := &http.Transport{
		DialContext:            (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		DisableCompression:     true,
		ResponseHeaderTimeout:  agentResponse + 10*time.Second,
		ExpectContinueTimeout:  time.Second,
		MaxIdleConnsPerHost:    64,
		IdleConnTimeout:        90 * time.Second,
		MaxResponseHeaderBytes: 64 << 10,
	}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			rt := pr.In.Context().Value(peerRouteKey{}).(*peerRoute)
			pr.Out.URL = &url.URL{Scheme: rt.target.Scheme, Host: rt.target.Host, Opaque: pathOnly(pr.In.RequestURI), RawQuery: pr.In.URL.RawQuery}
			pr.Out.Host = rt.target.Host
			stripScannerHeaders(pr.Out.Header)
			pr.Out.Header.Set("Authorization", "Bearer "+rt.secret)
			pr.Out.Header.Set(hdrHop, "1")
			pr.Out.Header.Set(hdrScanner, rt.scanner)
			pr.Out.Header.Set(httperr.RequestIDHeader, rt.rid)
			pr.Out.Header.Set(hdrPublicBase, rt.publicBase)
		},
		Transport:     tr,
		FlushInterval: 0,
		BufferPool:    r.copyBuffers,
		ErrorHandler: func(w http.ResponseWriter, req *http.Request, err error) {
			rt := req.Context().Value(peerRouteKey{}).(*peerRoute)
			var op *net.OpError
			switch {
			case req.Context().Err() != nil:
				r.log.Info("scanner went away", "request_id", rt.rid, "err", err)
			case errors.As(err, &op) && op.Op == "dial":
				// A replica that died keeps its registry entry until the
				// TTL; answer now rather than wait.
				r.log.Warn("replica holding the tunnel is unreachable", "request_id", rt.rid, "replica", rt.target.Host, "err", err)
				httperr.Respond(w, req, http.StatusServiceUnavailable, httperr.TunnelOffline, "the relay replica holding this tunnel is unreachable; retry")
			case errors.Is(err, errPeerRefused):
				// Not the scanner's fault, whatever the status: a 401
				// would send its operators looking at its token.
				r.log.Error("replica holding the tunnel refused this replica's peer secret: every replica needs the same registry.peer_secret_file (during a rotation, both lines)",
					"request_id", rt.rid, "replica", rt.target.Host)
				httperr.Respond(w, req, http.StatusBadGateway, httperr.UpstreamError, "the relay's replicas do not share a peer secret; the relay's operators must fix registry.peer_secret_file")
			case httpx.IsTimeout(err):
				httperr.Respond(w, req, http.StatusGatewayTimeout, httperr.UpstreamTimeout, "the replica holding the tunnel did not answer in time")
			default:
				r.log.Warn("forwarding to replica failed", "request_id", rt.rid, "replica", rt.target.Host, "err", err)
				httperr.Respond(w, req, http.StatusBadGateway, httperr.UpstreamError, "forwarding to the replica holding the tunnel failed")
			}
		},
		ModifyResponse: func(resp *http.Response) error {
			if resp.StatusCode == http.StatusUnauthorized && resp.Header.Get(hdrPeerRefused) != "" {
				return errPeerRefused
			}
			resp.Header.Del(httperr.RequestIDHeader) // same value, set by this replica
			return nil
		},
	}
	return &peerProxy{rp: rp, tr: tr}
}

// forwardToPeer sends a request for a tunnel this replica does not hold to
// a replica that does. It reports false (nothing written) when no replica
// holds it or the registry cannot say.
func (r *Relay) forwardToPeer(w http.ResponseWriter, req *http.Request, tunnelID, scanner, rid, publicBase string) (bool, string) {
	owners, err := r.registry.Owners(req.Context(), tunnelID)
	if err != nil {
		return false, "the relay's registry is unavailable, and no agent for this tunnel is connected to this replica"
	}
	if len(owners) == 0 {
		return false, ""
	}
	secret, _ := r.peerSecrets()
	if secret == "" {
		return false, "this replica has no peer secret to forward with (the registry unavailable since start, or peer_secret_file unreadable: see the relay's log)"
	}
	target, err := url.Parse(owners[rand.N(len(owners))])
	if err != nil {
		return false, ""
	}
	r.metrics.Forwarded.WithLabelValues(tunnelID, "out").Inc()
	rt := &peerRoute{target: target, scanner: scanner, rid: rid, publicBase: publicBase, secret: secret}
	p := r.peer.Load()
	p.rp.ServeHTTP(w, req.WithContext(context.WithValue(req.Context(), peerRouteKey{}, rt)))
	if r.peer.Load() != p {
		// A reload replaced the transport while this request was on its
		// way, and closed its idle connections; this one's would stay.
		p.tr.CloseIdleConnections()
	}
	return true, ""
}

// peerSecrets returns the secret this replica sends to the others and
// those it accepts from them (none until known). From a file of two
// lines, during a rotation, it sends the first and accepts either.
func (r *Relay) peerSecrets() (send string, accept []string) {
	if src := r.cfg.Registry.PeerSecret; src != nil {
		vs, err := src.Values()
		if err != nil {
			r.log.Error("peer secret unreadable; forwarding between replicas fails until it is fixed", "err", err)
			return "", nil
		}
		return vs[0], vs
	}
	if p := r.peerSecret.Load(); p != nil {
		return *p, []string{*p}
	}
	return "", nil
}

// checkPeer authenticates a request on the internal listener.
func (r *Relay) checkPeer(req *http.Request) bool {
	got, ok := bearerToken(req)
	if !ok || req.Header.Get(hdrHop) != "1" {
		return false
	}
	_, accept := r.peerSecrets()
	match := 0
	for _, want := range accept {
		match |= subtle.ConstantTimeCompare([]byte(got), []byte(want))
	}
	return match == 1
}

// peerSecretCheck is how often a replica compares its peer secret with
// Redis's.
const peerSecretCheck = 5 * time.Second

// runRegistry keeps the Redis registry's heartbeat and the shared peer
// secret until ctx ends. The secret is fetched at start (retried every
// second while Redis is unreachable), then checked every
// peerSecretCheck: after Redis lost its data, a replica that started
// since may have made a new one, and every replica must use the same.
func (r *Relay) runRegistry(ctx context.Context, red *registry.Redis) {
	done := make(chan struct{})
	go func() {
		defer close(done)
		red.Run(ctx)
	}()
	defer func() { <-done }()
	if r.cfg.Registry.PeerSecret != nil {
		return // from a file: nothing to share through Redis
	}
	warned := false
	for ctx.Err() == nil {
		have := ""
		if p := r.peerSecret.Load(); p != nil {
			have = *p
		}
		wait := peerSecretCheck
		s, err := red.PeerSecret(ctx, have)
		switch {
		case err != nil && have == "":
			if !warned {
				r.log.Warn("cannot get the shared peer secret from redis yet; forwarding between replicas waits for it", "err", err)
				warned = true
			}
			wait = time.Second
		case err != nil:
			// Redis is down: the registry reports that; keep the secret.
		case s != have:
			if have != "" {
				r.log.Warn("the peer secret in redis is not the one this replica used (redis lost its data and another replica made a new one); using redis's")
			}
			r.peerSecret.Store(&s)
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
		}
	}
}
