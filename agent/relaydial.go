package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/ferry-tunnel/ferry/internal/config"
)

// relayDialer is how the agent reaches the relay: its URL, the HTTP
// client for the upgrade (CA, timeouts) and the egress proxy. A reload
// that changes any of them builds a new one, tries it on a connection
// and only then puts it in use (moveRelay).
type relayDialer struct {
	url    string
	client *http.Client
	proxy  func(*url.URL) (*url.URL, error)
	// connectBound bounds one connection attempt with these settings:
	// TCP, TLS and upgrade timeouts and the hello.
	connectBound time.Duration
}

func newRelayDialer(cfg *config.Agent) (*relayDialer, error) {
	proxy, err := relayProxy(&cfg.Relay)
	if err != nil {
		return nil, err
	}
	client, err := newRelayClient(cfg, proxy)
	if err != nil {
		return nil, err
	}
	t := cfg.Timeouts
	return &relayDialer{url: cfg.Relay.URL, client: client, proxy: proxy,
		connectBound: t.Dial + t.TLSHandshake + t.Upgrade + handshakeTimeout}, nil
}

// relaySettingsDiffer names the settings of the relay connection that
// differ between two configs (the CA by its contents too, so a renewed
// CA file under the same name counts).
func relaySettingsDiffer(old, next *config.Agent) []string {
	var d []string
	add := func(name string, differ bool) {
		if differ {
			d = append(d, name)
		}
	}
	add("relay.url", old.Relay.URL != next.Relay.URL)
	add("relay.ca_file", old.Relay.CAFile != next.Relay.CAFile || !old.Relay.CA.Equal(next.Relay.CA))
	add("relay.proxy_url", old.Relay.ProxyURL != next.Relay.ProxyURL)
	add("timeouts.dial", old.Timeouts.Dial != next.Timeouts.Dial)
	add("timeouts.tls_handshake", old.Timeouts.TLSHandshake != next.Timeouts.TLSHandshake)
	add("timeouts.upgrade", old.Timeouts.Upgrade != next.Timeouts.Upgrade)
	return d
}

// moveReq asks a slot to move its live connection to d: connect with d
// while the current connection keeps serving, then drain the current one.
type moveReq struct {
	ctx    context.Context // the asker gave up once done: the slot then stays
	dialer *relayDialer
	done   chan error // buffered: the slot never waits on the asker
	// reports: the asker logs the outcome (a reload's first try); else
	// the slot does.
	reports bool
}

// requestMove hands a slot a move request, replacing one it has not
// taken yet (only the newest settings matter).
func (c *connState) requestMove(r *moveReq) {
	for {
		select {
		case c.move <- r:
			return
		default:
		}
		select {
		case old := <-c.move:
			old.done <- errMoveSuperseded
		default:
		}
	}
}

var errMoveSuperseded = errors.New("superseded by a later reload")

// moveRelay puts new relay settings in use without a gap: one live
// connection first connects with them while it keeps serving, and only
// if that works are they adopted; then every other live connection
// moves the same way, in the background. No connection up: nothing to
// try them on, so they are used from the next dial.
func (a *Agent) moveRelay(next *config.Agent, changed []string) error {
	d, err := newRelayDialer(next)
	if err != nil {
		return err
	}
	var live []*connState
	for _, st := range a.slots.all() {
		if st.session() != nil {
			live = append(live, st)
		}
	}
	if len(live) == 0 {
		a.relay.Swap(d).client.CloseIdleConnections()
		a.log.Info("relay settings changed; no connection is up to move, the next dial uses them", "changed", changed, "relay", d.url)
		return nil
	}
	bound := d.connectBound + 5*time.Second
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	first := &moveReq{ctx: ctx, dialer: d, done: make(chan error, 1), reports: true}
	live[0].requestMove(first)
	select {
	case err = <-first.done:
	case <-ctx.Done():
		err = fmt.Errorf("no answer in %s", bound)
	}
	if err != nil {
		d.client.CloseIdleConnections()
		return fmt.Errorf("a connection to %s with the new relay settings (%v) failed, so the running connections stay as they are: %w", d.url, changed, err)
	}
	a.relay.Swap(d).client.CloseIdleConnections()
	for _, st := range live[1:] {
		// Each slot moves on its own; a failure leaves it on its current
		// connection, which redials with the new settings when it ends.
		st.requestMove(&moveReq{ctx: context.Background(), dialer: d, done: make(chan error, 1)})
	}
	a.log.Info("relay settings changed; the first connection moved to them, the others follow, each serving until its successor is up", "changed", changed, "relay", d.url)
	return nil
}
