package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/proto"
)

// idleAgent is one lightweight agent connection: the real handshake, then
// nothing but yamux keepalives.
type idleAgent struct{ sess *yamux.Session }

func (a *idleAgent) Close() { a.sess.Close() }

func connectIdleAgents(ctx context.Context, s *setup, n int) ([]*idleAgent, error) {
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: s.pki.Pool}, MaxIdleConns: -1}}
	var mu sync.Mutex
	var out []*idleAgent
	var firstErr error
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			a, err := connectOne(ctx, s, client, i)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				if firstErr == nil {
					firstErr = err
				}
				return
			}
			out = append(out, a)
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return out, fmt.Errorf("%d of %d agents connected: %w", len(out), n, firstErr)
	}
	return out, nil
}

func connectOne(ctx context.Context, s *setup, client *http.Client, i int) (*idleAgent, error) {
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	hdr := http.Header{"Authorization": {"Bearer " + s.agentTok}}
	ws, _, err := websocket.Dial(dctx, "wss://"+s.agentAddr+proto.ConnectPath, &websocket.DialOptions{HTTPClient: client, HTTPHeader: hdr, Subprotocols: []string{proto.Subprotocol}})
	if err != nil {
		return nil, err
	}
	sess, err := yamux.Client(proto.WebSocketConn(ctx, ws, nil), proto.YamuxConfig(logging.Discard(), 15*time.Second, proto.AgentStreamWindow))
	if err != nil {
		return nil, err
	}
	ctrl, err := sess.OpenStream()
	if err != nil {
		sess.Close()
		return nil, err
	}
	if err := proto.WriteHeader(ctrl, proto.Header{Kind: proto.KindControl}); err != nil {
		sess.Close()
		return nil, err
	}
	if err := proto.WriteMessage(ctrl, proto.Message{Type: proto.MsgHello, AgentID: fmt.Sprintf("bench-%d", i), Version: "bench", Upstreams: []string{"bitbucket"}, KeepaliveMS: 15000}); err != nil {
		sess.Close()
		return nil, err
	}
	if m, err := proto.ReadMessage(ctrl); err != nil || m.Type != proto.MsgWelcome {
		sess.Close()
		return nil, fmt.Errorf("hello: %v %v", m.Type, err)
	}
	return &idleAgent{sess: sess}, nil
}
