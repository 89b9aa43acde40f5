package relay

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/token"
	"github.com/ferry-tunnel/ferry/proto"
)

var (
	nameRE    = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)
	agentIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$`)
)

// handleConnect is the agent endpoint: authenticate, upgrade, handshake;
// the connection then lives on without this handler (see startAgent).
func (r *Relay) handleConnect(w http.ResponseWriter, req *http.Request) {
	rid := httperr.NewRequestID()
	w.Header().Set(httperr.RequestIDHeader, rid)
	log := r.log.With("remote", req.RemoteAddr, "request_id", rid)

	src := sourceOf(req.RemoteAddr)
	if lim, retry := r.limiter.limited(src); lim {
		r.metrics.RateLimited.WithLabelValues("agent").Inc()
		log.Warn("agent refused: too many failed authentications from this address")
		w.Header().Set("Retry-After", strconv.Itoa(int(retry.Seconds())+1))
		httperr.Write(w, http.StatusTooManyRequests, httperr.TooManyRequests, "too many failed authentications from this address; retry later")
		return
	}
	tok, ok := bearerToken(req)
	if !ok {
		r.limiter.failed(src)
		r.metrics.AuthFailures.WithLabelValues("agent").Inc()
		log.Warn("agent refused: no bearer token")
		httperr.Write(w, http.StatusUnauthorized, httperr.Unauthorized, "agent token missing: send Authorization: Bearer <token>")
		return
	}
	th := token.Of(tok)
	t := r.tunnelForAgent(th)
	if t == nil {
		r.limiter.failed(src)
		r.metrics.AuthFailures.WithLabelValues("agent").Inc()
		log.Warn("agent refused: token matches no tunnel")
		httperr.Write(w, http.StatusUnauthorized, httperr.Unauthorized, "agent token not accepted by any tunnel on this relay")
		return
	}
	if !offersSubprotocol(req, proto.Subprotocol) {
		log.Warn("agent refused: wrong subprotocol", "offered", req.Header.Get("Sec-WebSocket-Protocol"))
		httperr.Write(w, http.StatusBadRequest, httperr.BadRequest, "agent must speak WebSocket subprotocol "+proto.Subprotocol+" (agent and relay versions incompatible?)")
		return
	}
	limit := r.auth.Load().maxAgentConns
	n, ok := t.join(limit)
	if !ok {
		r.metrics.AgentConnects.WithLabelValues(t.id, "over_limit").Inc()
		log.Warn("agent refused: its tunnel holds its limit of agent connections on this relay", "tunnel", t.id, "connections", n, "limit", limit)
		w.Header().Set("Retry-After", "30")
		httperr.Write(w, http.StatusServiceUnavailable, httperr.TunnelBusy,
			fmt.Sprintf("tunnel %s already holds %d agent connections on this relay, its limit (limits.max_agent_connections_per_tunnel): agents started twice, or a leaked agent token?", t.id, n))
		return
	}
	// startAgent returns once the connection is in the tunnel (which then
	// holds the place join gave), or failed.
	inTunnel := false
	defer func() {
		if !inTunnel {
			t.joined()
		}
	}()
	if !r.trackSession() {
		httperr.Write(w, http.StatusServiceUnavailable, httperr.TunnelOffline, "relay is shutting down; reconnect to another replica")
		return
	}
	slot := proto.CorkSlotFrom(req.Context())
	ws, err := websocket.Accept(leanHijack{w, slot}, req, &websocket.AcceptOptions{Subprotocols: []string{proto.Subprotocol}})
	if err != nil {
		r.sessions.Done()
		log.Warn("agent WebSocket upgrade failed", "err", err)
		return
	}
	var cork proto.Corker
	if slot != nil {
		cork = slot.Corker()
	}
	if inTunnel, err = r.startAgent(newAgentSession(r, t, req.RemoteAddr, rid), ws, cork, th); err != nil {
		log.Info("agent connection ended", "tunnel", t.id, "err", err)
	}
}

// startAgent runs an upgraded agent connection's handshake and puts the
// agent in its tunnel. It returns then: from here the connection runs
// on yamux's goroutines, and the session tears itself down when it ends
// (see agentSession). This goroutine, whose stack grew deep in the TLS
// handshake, does not stay for the months a tunnel may live. inTunnel
// reports whether the connection was added to its tunnel.
func (r *Relay) startAgent(a *agentSession, ws *websocket.Conn, cork proto.Corker, th token.Hash) (inTunnel bool, err error) {
	t, log := a.t, a.log
	out := proto.WebSocketConn(r.life, ws, cork)
	conn := &sessionConn{out: out, closed: a.ended}
	conn.in = proto.WatchFrames(out, a.frame)
	// No pings from here: agents ping, and a silent agent is cut by the
	// read deadline set after the hello (older agents get pinged).
	sess, err := yamux.Server(conn, proto.YamuxConfig(log, 0, proto.RelayStreamWindow))
	if err != nil {
		out.Close() // also stops the conn's flusher
		r.sessions.Done()
		return false, fmt.Errorf("start session: %w", err)
	}
	a.sess = sess
	established := false
	defer func() {
		if !established {
			sess.Close()
			r.sessions.Done()
		}
	}()

	rebalanced, err := r.handshake(a, th)
	if err != nil {
		r.metrics.AgentConnects.WithLabelValues(t.id, "handshake_failed").Inc()
		log.Warn("agent handshake failed", "err", err)
		return false, err
	}
	ac := a.ac.Load()
	if r.mayRebalance(r.life, rebalanced) {
		if !t.addUnlessSameAgent(ac) {
			// Behind a load balancer the agent's reconnect likely lands on
			// another replica, so one replica restart does not take the
			// tunnel offline. The agent stops being asked after 3 tries.
			r.metrics.AgentConnects.WithLabelValues(t.id, "rebalanced").Inc()
			log.Info("this replica already holds a connection of this agent; asking it to reconnect elsewhere", "attempt", rebalanced+1)
			ac.goAway(proto.GoAwayRebalance)
			select { // let the agent close it; a slow one is cut
			case <-sess.CloseChan():
			case <-time.After(2 * time.Second):
			}
			return false, nil
		}
	} else {
		t.add(ac)
	}
	established = true
	r.metrics.AgentConnects.WithLabelValues(t.id, "accepted").Inc()
	ac.connGauge.Inc()
	r.syncRegistry(t)
	log.Info("agent connected", "version", ac.version, "upstreams", strings.Join(ac.upstreamNames(), ","))
	if ac.keepalive > 0 {
		// Its pings (and their answers) keep load balancers from timing
		// the tunnel out; two missed in a row, plus a grace, and it is
		// gone (40 s at the default 15 s).
		out.SetReadIdle(2*ac.keepalive + min(ac.keepalive, proto.WriteTimeout))
	}
	if !a.establish() {
		a.finish() // it closed while joining the tunnel
	}
	return true, nil
}

// pingLoop pings an agent that does not ping (older agents) every
// interval until ctx ends or the session does; an unanswered ping closes
// the session.
func pingLoop(ctx context.Context, sess *yamux.Session, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-sess.CloseChan():
			return
		case <-t.C:
			if _, err := sess.Ping(); err != nil {
				sess.Close()
				return
			}
		}
	}
}

// mayRebalance reports whether a new connection may be sent elsewhere:
// several replicas are live and the agent has not been asked 3 times.
func (r *Relay) mayRebalance(ctx context.Context, rebalanced int) bool {
	if r.redis == nil || rebalanced >= proto.MaxRebalance || r.stopping.Load() {
		return false
	}
	n, err := r.registry.Replicas(ctx)
	return err == nil && n > 1
}

// syncRegistry tells the registry whether this replica holds t now. Calls
// are ordered per tunnel, and each states the current truth, so a late
// call cannot undo a newer one.
func (r *Relay) syncRegistry(t *tunnel) {
	t.regMu.Lock()
	defer t.regMu.Unlock()
	if t.held() {
		r.registry.Hold(t.id)
	} else {
		r.registry.Release(t.id)
	}
}

// handshake reads the agent's hello on its control stream and answers,
// setting a.ac. It returns the hello's count of rebalance goaways in a
// row.
func (r *Relay) handshake(a *agentSession, th token.Hash) (int, error) {
	t, sess := a.t, a.sess
	hctx, cancel := context.WithTimeout(r.life, r.tmo().AgentHandshake)
	defer cancel()
	ctrl, err := sess.AcceptStreamWithContext(hctx)
	if err != nil {
		return 0, fmt.Errorf("wait for control stream: %w", err)
	}
	a.ctrl.s = ctrl
	ctrl.SetDeadline(time.Now().Add(r.tmo().AgentHandshake))
	hdr, err := proto.ReadHeader(&a.ctrl)
	if err != nil {
		return 0, err
	}
	if hdr.Kind != proto.KindControl {
		return 0, fmt.Errorf("first stream is %s, want control", hdr.Kind)
	}
	hello, err := proto.ReadMessage(&a.ctrl)
	if err != nil {
		return 0, err
	}
	reject := func(reason string) error {
		proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgReject, Reason: reason})
		return errors.New("rejected hello: " + reason)
	}
	if hello.Type != proto.MsgHello {
		return 0, reject("first control message must be hello, got " + hello.Type)
	}
	if !agentIDRE.MatchString(hello.AgentID) {
		return 0, reject("agent_id must be 1-128 letters, digits or ._@:-")
	}
	ups, err := upstreamSet(hello.Upstreams)
	if err != nil {
		return 0, reject(err.Error())
	}
	if len(hello.Version) > 64 || !agentIDRE.MatchString("v"+hello.Version) {
		return 0, reject("version must be up to 64 letters, digits or ._@:-")
	}
	ac := &agentConn{
		id:          httperr.NewRequestID(),
		tunnel:      t,
		agentID:     hello.AgentID,
		version:     hello.Version,
		remote:      a.remote,
		tokenHash:   th,
		connectedAt: time.Now(),
		sess:        sess,
		ctrl:        ctrl,
		// Taken now: a tunnel removed by a reload loses its series, and
		// this connection's count must not bring them back.
		connGauge: r.metrics.AgentConnections.WithLabelValues(t.id),
	}
	if hello.KeepaliveMS < 0 || hello.KeepaliveMS > 10*60*1000 {
		return 0, reject("keepalive_ms must be 0-600000")
	}
	ac.keepalive = time.Duration(hello.KeepaliveMS) * time.Millisecond
	ac.keepAlive = slices.Contains(hello.Capabilities, proto.CapKeepAlive)
	ac.upstreams.Store(&ups)
	if err := proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgWelcome, RelayID: r.id, Tunnel: t.id, ConnectionID: ac.id}); err != nil {
		return 0, err
	}
	ctrl.SetDeadline(time.Time{})
	ctrl.Shrink() // the hello's buffer; see readControl
	a.ac.Store(ac)
	return hello.Rebalanced, nil
}

// upstreamSet validates the upstream names an agent announces and
// returns them sorted, without repeats. A sorted slice, not a map: an
// agent announces a few names, and a small map costs ten times the bytes,
// times thousands of agents.
func upstreamSet(names []string) ([]string, error) {
	if len(names) == 0 || len(names) > 64 {
		return nil, errors.New("an agent must announce 1-64 upstreams")
	}
	for _, u := range names {
		if !nameRE.MatchString(u) {
			return nil, fmt.Errorf("upstream name %q is invalid", u)
		}
	}
	ups := slices.Clone(names)
	slices.Sort(ups)
	return slices.Clip(slices.Compact(ups)), nil
}

func (r *Relay) tunnelForAgent(h token.Hash) *tunnel {
	a := r.auth.Load()
	if i := token.Index(a.agentHashes, h); i >= 0 {
		return a.agentTunnel[i]
	}
	return nil
}

func bearerToken(req *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(req.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return "", false
	}
	tok = strings.TrimSpace(tok)
	return tok, tok != ""
}

func offersSubprotocol(req *http.Request, want string) bool {
	for _, h := range req.Header.Values("Sec-WebSocket-Protocol") {
		for _, p := range strings.Split(h, ",") {
			if strings.TrimSpace(p) == want {
				return true
			}
		}
	}
	return false
}
