package agent

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"
	"golang.org/x/net/http/httpproxy"

	"github.com/ferry-tunnel/ferry/internal/certfile"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/version"
	"github.com/ferry-tunnel/ferry/proto"
)

const (
	handshakeTimeout = 10 * time.Second
	// stableAfter: a connection that lived this long resets the backoff.
	stableAfter = 5 * time.Second
	// maxQuickGoAways: goaways in a row, each on a connection that lived
	// under stableAfter, answered by reconnecting at once (the relay
	// asks for a rebalance at most 3 times); more get backoff.
	maxQuickGoAways = 3
)

// relayProxy returns the egress proxy for the relay connection: proxy_url
// if set, else HTTPS_PROXY/HTTP_PROXY and NO_PROXY as the environment had
// them at start. (The proxy URL may carry user:password for basic auth.)
func relayProxy(rc *config.RelayClient) (func(*url.URL) (*url.URL, error), error) {
	if rc.ProxyURL != "" {
		u, err := url.Parse(rc.ProxyURL)
		if err != nil {
			return nil, fmt.Errorf("relay.proxy_url: %w", err)
		}
		return func(*url.URL) (*url.URL, error) { return u, nil }, nil
	}
	return httpproxy.FromEnvironment().ProxyFunc(), nil
}

// proxyFor is the proxy (nil: none) d uses to reach its relay URL. The
// WebSocket URL is mapped to http(s) for NO_PROXY and scheme matching.
func (d *relayDialer) proxyFor() (*url.URL, error) {
	u, err := url.Parse(d.url)
	if err != nil {
		return nil, err
	}
	hu := *u
	switch u.Scheme {
	case "wss":
		hu.Scheme = "https"
	case "ws":
		hu.Scheme = "http"
	}
	return d.proxy(&hu)
}

// ProxyRefusal explains an egress proxy's refusal of CONNECT to target.
func ProxyRefusal(proxyURL *url.URL, target string, code int, status string) error {
	hint := "check the proxy's log"
	switch code {
	case http.StatusProxyAuthRequired:
		hint = "the proxy wants credentials: put user:password in relay.proxy_url (or HTTPS_PROXY)"
	case http.StatusUnauthorized:
		hint = "the proxy did not accept the user:password in relay.proxy_url"
	case http.StatusForbidden:
		hint = "the proxy does not allow CONNECT to " + target + ": ask for a rule allowing the relay (and port)"
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout, http.StatusInternalServerError:
		hint = "the proxy could not reach " + target + " itself: check the relay is up and the proxy's outbound network"
	}
	return fmt.Errorf("egress proxy %s refused CONNECT to %s: %s; %s", proxyURL.Redacted(), target, status, hint)
}

// newRelayClient builds the HTTP client used for the WebSocket upgrade:
// TLS 1.2+, the configured CA (or system roots), and the egress proxy.
func newRelayClient(cfg *config.Agent, proxy func(*url.URL) (*url.URL, error)) (*http.Client, error) {
	rc := struct {
		*config.RelayClient
		timeouts config.AgentTimeouts
	}{&cfg.Relay, cfg.Timeouts}
	dialer := &net.Dialer{Timeout: rc.timeouts.Dial, KeepAlive: 30 * time.Second}
	tr := &http.Transport{
		Proxy: func(r *http.Request) (*url.URL, error) { return proxy(r.URL) },
		// The raw connection (to the relay or to the proxy, beneath TLS
		// either way) goes to the tunnel through the dial's context, so
		// that it can send each batch of frames in one syscall.
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			cc := proto.NewCorkConn(c)
			if slot := proto.CorkSlotFrom(ctx); slot != nil {
				slot.Add(cc)
			}
			return cc, nil
		},
		TLSClientConfig:       &tls.Config{RootCAs: rc.CA, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout:   rc.timeouts.TLSHandshake,
		ResponseHeaderTimeout: rc.timeouts.Upgrade,
		DisableCompression:    true,
		MaxIdleConns:          1,
		IdleConnTimeout:       time.Second,
		OnProxyConnectResponse: func(_ context.Context, proxyURL *url.URL, req *http.Request, resp *http.Response) error {
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			return ProxyRefusal(proxyURL, req.URL.Host, resp.StatusCode, resp.Status)
		},
	}
	return &http.Client{Transport: corkUpgrades{tr}}, nil
}

// corkUpgrades puts a cork above TLS on an upgraded connection, for the
// tunnel to hold around each batch of frames. The WebSocket client masks
// a message through a 4 KiB buffer and writes each 4 KiB as it is
// masked: without the cork, each is a TLS record of its own (4x the
// records, seals and reads on both ends of a download); with it, a batch
// reaches TLS in one write and leaves in full 16 KiB records.
type corkUpgrades struct{ *http.Transport }

func (t corkUpgrades) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := t.Transport.RoundTrip(req)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		return resp, err
	}
	rwc, ok := resp.Body.(io.ReadWriteCloser)
	slot := proto.CorkSlotFrom(req.Context())
	if !ok || slot == nil {
		return resp, nil
	}
	c := proto.NewCork(rwc)
	slot.Add(c)
	resp.Body = corkedBody{ReadWriteCloser: rwc, cork: c}
	return resp, nil
}

// corkedBody is an upgraded connection whose writes go through a cork.
type corkedBody struct {
	io.ReadWriteCloser
	cork *proto.Cork
}

func (b corkedBody) Write(p []byte) (int, error) { return b.cork.Write(p) }

// goAwayError: the relay asked this connection to move. The slot
// reconnects at once while the old session finishes its streams.
type goAwayError struct{ reason string }

func (e goAwayError) Error() string { return "relay asked this connection to go away: " + e.reason }

// keepConnected holds a slot's relay connection up until ctx ends or a
// reload retires the slot, reconnecting with backoff. Once the agent
// drains it stops dialling.
func (a *Agent) keepConnected(ctx context.Context, st *connState) {
	slot := st.slot
	defer func() { // a reload waiting on this slot hears now, not at its timeout
		select {
		case req := <-st.move:
			req.done <- errors.New("the connection stopped (agent stopping, or fewer relay.connections)")
		default:
		}
	}()
	b := newBackoff()
	quickGoAways := 0   // goaways in a row on connections that lived under stableAfter
	var moved *liveConn // made by a move (reload), to serve at once
	for {
		if ctx.Err() != nil {
			if moved != nil {
				moved.sess.Close()
			}
			return
		}
		// A successor made by a move is served even now: the relay may
		// already have sent it requests. serve drains it at once.
		if moved == nil && st.retired() {
			return
		}
		if moved == nil && a.draining.Load() {
			<-ctx.Done()
			return
		}
		started := time.Now()
		lc := moved
		moved = nil
		var err error
		if lc == nil {
			lc, err = a.connect(ctx, st, a.relay.Load(), st.rebalanced)
		}
		up := err == nil
		if up {
			err = a.serve(ctx, st, lc)
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errHandedOff) {
			continue
		}
		var mv movedError
		if errors.As(err, &mv) {
			moved = mv.next
			quickGoAways = 0
			b.reset()
			continue
		}
		st.failed(err)
		a.metrics.Reconnects.Inc()
		var ga goAwayError
		isGoAway := errors.As(err, &ga)
		if isGoAway && ga.reason == proto.GoAwayRebalance {
			st.rebalanced++
		} else {
			st.rebalanced = 0
		}
		if isGoAway {
			if time.Since(started) >= stableAfter {
				quickGoAways = 0
				b.reset()
			}
			// Goaway means "reconnect now", but a relay that sends every
			// connection away at once (misbehaving, or replicas that keep
			// rebalancing past their 3 asks) gets backoff, not a tight loop.
			if quickGoAways++; quickGoAways <= maxQuickGoAways {
				a.log.Info("reconnecting after goaway", "slot", slot, "reason", err)
				continue
			}
			delay := b.next()
			a.log.Warn("relay keeps sending this agent's connections away at once; backing off", "slot", slot, "reason", err,
				"in_a_row", quickGoAways, "retry_in", delay.Round(time.Millisecond).String())
			if !sleep(ctx, delay, st.retire) {
				return
			}
			continue
		}
		if up && time.Since(started) >= stableAfter {
			b.reset()
		}
		delay := b.next()
		var refused refusedError
		if errors.As(err, &refused) {
			// The relay said when; trying sooner would be refused again,
			// at the cost of a TLS handshake on both sides.
			delay = max(delay, refused.retryAfter)
		}
		a.log.Warn("relay connection lost; reconnecting", "slot", slot, "err", err, "retry_in", delay.Round(time.Millisecond).String())
		if !sleep(ctx, delay, st.retire) {
			return
		}
	}
}

// liveConn is a relay connection the relay has welcomed.
type liveConn struct {
	sess         *yamux.Session
	ctrl         *yamux.Stream
	welcome      proto.Message
	certNotAfter time.Time
	dialer       *relayDialer // the settings it was made with
}

// movedError: the slot's connection moved to next (new relay settings);
// the old one finishes its streams in the background.
type movedError struct{ next *liveConn }

func (movedError) Error() string { return "connection moved to new relay settings" }

// errHandedOff: the connection drains in the background because the
// agent is draining or the slot was retired; the slot dials no more.
var errHandedOff = errors.New("connection handed off to drain")

// connect dials the relay with d, starts the session and introduces this
// agent, saying how often in a row the slot was asked to rebalance.
func (a *Agent) connect(ctx context.Context, st *connState, d *relayDialer, rebalanced int) (*liveConn, error) {
	cork := &proto.CorkSlot{}
	ws, certNotAfter, err := a.dial(proto.WithCorkSlot(ctx, cork), d)
	if err != nil {
		return nil, err
	}
	conn := proto.WebSocketConn(ctx, ws, cork.Corker())
	sess, err := yamux.Client(conn, proto.YamuxConfig(a.log, a.config().Timeouts.Keepalive, proto.AgentStreamWindow))
	if err != nil {
		conn.Close() // also stops the conn's flusher
		return nil, fmt.Errorf("start session: %w", err)
	}
	ctrl, welcome, err := a.hello(sess, rebalanced)
	if err != nil {
		sess.Close()
		return nil, err
	}
	return &liveConn{sess: sess, ctrl: ctrl, welcome: welcome, certNotAfter: certNotAfter, dialer: d}, nil
}

// serve serves one welcomed relay connection until it ends, the relay
// sends goaway, or a reload moves it (movedError).
func (a *Agent) serve(ctx context.Context, st *connState, lc *liveConn) error {
	sess, ctrl, welcome, certNotAfter := lc.sess, lc.ctrl, lc.welcome, lc.certNotAfter
	log := a.log.With("slot", st.slot, "relay_id", welcome.RelayID, "connection_id", welcome.ConnectionID)
	st.connected(welcome, certNotAfter)
	st.setLive(ctrl, sess)
	a.metrics.RelayConnections.Inc()
	log.Info("connected to relay", "relay", lc.dialer.url, "tunnel", welcome.Tunnel)
	if !certNotAfter.IsZero() {
		a.metrics.RelayCertExpiry.WithLabelValues().Set(float64(certNotAfter.Unix()))
		if level, _ := certfile.Urgency(certNotAfter); level > slog.LevelInfo {
			// The relay's operators renew it; this side is where an
			// expired one stops the tunnel, so say so here too.
			log.Warn("the relay's TLS certificate expires soon; tell the relay's operators (agents refuse it once expired)",
				"not_after", certNotAfter.UTC().Format(time.RFC3339), "days_left", certfile.DaysLeft(certNotAfter))
		}
	}

	var inflight atomic.Int64 // streams of this session being served
	goaway := make(chan string, 1)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // control stream reader; ends with the session
		defer wg.Done()
		for {
			m, err := proto.ReadMessage(ctrl)
			if err != nil {
				return
			}
			switch m.Type {
			case proto.MsgGoAway:
				select {
				case goaway <- m.Reason:
				default:
				}
			case proto.MsgDraining:
				st.drainAcked()
			default:
				log.Debug("control message from relay", "type", m.Type)
			}
		}
	}()
	go func() { // stream acceptor; ends with the session
		defer wg.Done()
		for {
			s, err := sess.AcceptStream()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				a.dispatch(ctx, s, &inflight, log)
			}()
		}
	}()
	finish := func() {
		sess.Close()
		wg.Wait()
		a.metrics.RelayConnections.Dec()
	}
	// finishLater lets the session finish its streams while the slot
	// goes on with another connection. The drainer belongs to the
	// agent's bg group.
	finishLater := func() {
		a.bg.Add(1)
		a.finishing.Add(1)
		go func() {
			defer a.bg.Done()
			defer a.finishing.Add(-1)
			deadline := time.NewTimer(a.drainTimeout())
			defer deadline.Stop()
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			for inflight.Load() > 0 || !sessionSettled(sess) {
				select {
				case <-sess.CloseChan():
				case <-deadline.C:
				case <-tick.C:
					continue
				}
				break
			}
			finish()
		}()
	}
	// handOff has the relay send this connection nothing more (its ack
	// means nothing is on the way) and lets it finish what it carries in
	// the background.
	handOff := func() {
		if ack := st.startDrain(); ack != nil {
			t := time.NewTimer(2 * time.Second)
			select {
			case <-ack:
			case <-sess.CloseChan():
			case <-t.C:
				log.Warn("relay did not acknowledge draining in 2s; moving on")
			}
			t.Stop()
		}
		st.setLive(nil, nil)
		finishLater()
	}
	// The agent began to drain, or the slot was retired, before this
	// connection was live (a move's successor): drain it as the rest.
	if a.draining.Load() || st.retired() {
		handOff()
		return errHandedOff
	}
	for {
		select {
		case <-sess.CloseChan():
			st.setLive(nil, nil)
			finish()
			return errors.New("relay connection closed")
		case <-st.retire:
			log.Info("relay.connections lowered by a reload; this connection finishes its streams and closes")
			handOff()
			return errHandedOff
		case <-ctx.Done():
			st.setLive(nil, nil)
			finish()
			return ctx.Err()
		case reason := <-goaway:
			st.setLive(nil, nil)
			log.Info("relay asked this connection to go away; reconnecting while its streams finish", "reason", reason)
			finishLater()
			return goAwayError{reason}
		case req := <-st.move:
			if req.dialer == lc.dialer || req.ctx.Err() != nil {
				req.done <- nil // made with these settings already, or the asker gave up
				continue
			}
			if st.retired() { // a successor would only be drained
				req.done <- errors.New("the connection is closing (fewer relay.connections)")
				continue
			}
			// A successor sent away to rebalance would leave the slot
			// without a connection once this one drains: it stays where
			// it lands (the next reconnect spreads again).
			next, err := a.connect(ctx, st, req.dialer, proto.MaxRebalance)
			if err == nil && req.ctx.Err() != nil {
				next.sess.Close() // too late: the reload was refused meanwhile
				err = req.ctx.Err()
			}
			if err != nil {
				if !req.reports {
					log.Warn("could not connect with the new relay settings; this connection stays, and redials with them when it ends", "relay", req.dialer.url, "err", err)
				}
				req.done <- err
				continue
			}
			// The successor is up: this one hands off.
			handOff()
			req.done <- nil
			log.Info("moved to new relay settings; this connection finishes its streams", "relay", req.dialer.url)
			return movedError{next: next}
		}
	}
}

// sessionSettled reports whether every stream of a session but its control stream
// is closed on both ends. A stream the agent has finished writing may
// still have data queued or in flight; the relay closes its end only after
// reading to the end, so closing the session before then could cut the
// tail of a response.
func sessionSettled(sess *yamux.Session) bool { return sess.IsClosed() || sess.NumStreams() <= 1 }

// dispatch reads a stream's header and hands it to whoever serves its kind.
// inflight counts the session's streams until the server closes them.
func (a *Agent) dispatch(ctx context.Context, s *yamux.Stream, inflight *atomic.Int64, log *slog.Logger) {
	// A relay that opens streams and says nothing costs a goroutine for
	// at most this long.
	s.SetReadDeadline(time.Now().Add(a.config().Timeouts.StreamHeader))
	h, err := proto.ReadHeader(s)
	if err != nil {
		log.Warn("bad stream from relay", "err", err)
		s.Close()
		return
	}
	s.SetReadDeadline(time.Time{})
	switch h.Kind {
	case proto.KindHTTP, proto.KindHTTPKeepAlive:
		inflight.Add(1)
		tc := &tunnelConn{Stream: s, header: h, keepAlive: h.Kind == proto.KindHTTPKeepAlive, release: func() { inflight.Add(-1) }}
		if !a.streams.offer(ctx, tc) {
			tc.Close()
		}
	default:
		log.Warn("relay opened a stream of an unsupported kind", "kind", h.Kind.String())
		s.Close()
	}
}

// dial opens the WebSocket to the relay with d's settings and explains
// refusals. certNotAfter is when the certificate the relay presented
// expires (zero over ws://).
func (a *Agent) dial(ctx context.Context, d *relayDialer) (ws *websocket.Conn, certNotAfter time.Time, err error) {
	tok, err := a.config().Relay.Token.Value()
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("relay token: %w", err)
	}
	hdr := http.Header{}
	hdr.Set("Authorization", "Bearer "+tok)
	hdr.Set("User-Agent", "ferry-agent/"+version.Version)
	// ctx (not a timeout context) because it outlives the handshake as the
	// connection's context; the transport's timeouts bound the handshake.
	ws, resp, err := websocket.Dial(ctx, d.url, &websocket.DialOptions{
		HTTPClient:   d.client,
		HTTPHeader:   hdr,
		Subprotocols: []string{proto.Subprotocol},
	})
	if err != nil {
		return nil, time.Time{}, describeDialError(d.url, resp, err)
	}
	if ws.Subprotocol() != proto.Subprotocol {
		ws.CloseNow()
		return nil, time.Time{}, fmt.Errorf("dial relay %s: relay did not agree to subprotocol %s (is it a ferry relay?)", d.url, proto.Subprotocol)
	}
	if resp.TLS != nil && len(resp.TLS.PeerCertificates) > 0 {
		certNotAfter = resp.TLS.PeerCertificates[0].NotAfter
	}
	return ws, certNotAfter, nil
}

// refusedError is a relay's refusal of the upgrade that asked the agent
// to wait (Retry-After: rate limited, the tunnel's connection limit, a
// replica shutting down).
type refusedError struct {
	err        error
	retryAfter time.Duration
}

func (e refusedError) Error() string { return e.err.Error() }
func (e refusedError) Unwrap() error { return e.err }

func describeDialError(relayURL string, resp *http.Response, err error) error {
	if resp == nil {
		return fmt.Errorf("dial relay %s: %w", relayURL, err)
	}
	if ra := retryAfter(resp.Header); ra > 0 {
		return refusedError{err: describeRefusal(relayURL, resp, err), retryAfter: ra}
	}
	return describeRefusal(relayURL, resp, err)
}

func describeRefusal(relayURL string, resp *http.Response, err error) error {
	msg := ""
	if resp.Body != nil {
		var body httperr.Body
		if b, rerr := io.ReadAll(io.LimitReader(resp.Body, 1024)); rerr == nil && json.Unmarshal(b, &body) == nil {
			msg = body.Message
		}
	}
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		return fmt.Errorf("dial relay %s: relay answered 401: the agent token is not accepted by any tunnel (%s)", relayURL, msg)
	case http.StatusNotFound:
		return fmt.Errorf("dial relay %s: relay answered 404: wrong path? agents connect to %s", relayURL, proto.ConnectPath)
	}
	if msg != "" {
		return fmt.Errorf("dial relay %s: relay answered %s: %s", relayURL, resp.Status, msg)
	}
	return fmt.Errorf("dial relay %s: relay answered %s: %w", relayURL, resp.Status, err)
}

// hello opens the control stream and introduces this agent.
func (a *Agent) hello(sess *yamux.Session, rebalanced int) (*yamux.Stream, proto.Message, error) {
	ctrl, err := sess.OpenStream()
	if err != nil {
		return nil, proto.Message{}, fmt.Errorf("open control stream: %w", err)
	}
	ctrl.SetDeadline(time.Now().Add(handshakeTimeout))
	if err := proto.WriteHeader(ctrl, proto.Header{Kind: proto.KindControl}); err != nil {
		return nil, proto.Message{}, err
	}
	hello := proto.Message{Type: proto.MsgHello, AgentID: a.config().AgentID, Version: version.Version, Upstreams: a.upstreams().names, Rebalanced: rebalanced,
		KeepaliveMS: a.config().Timeouts.Keepalive.Milliseconds(), Capabilities: []string{proto.CapKeepAlive}}
	if err := proto.WriteMessage(ctrl, hello); err != nil {
		return nil, proto.Message{}, err
	}
	m, err := proto.ReadMessage(ctrl)
	if err != nil {
		return nil, proto.Message{}, fmt.Errorf("wait for relay welcome: %w", err)
	}
	switch m.Type {
	case proto.MsgWelcome:
	case proto.MsgReject:
		return nil, m, fmt.Errorf("relay rejected hello: %s", m.Reason)
	default:
		return nil, m, fmt.Errorf("relay answered hello with %q", m.Type)
	}
	ctrl.SetDeadline(time.Time{})
	return ctrl, m, nil
}
