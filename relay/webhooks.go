package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/secret"
	"github.com/ferry-tunnel/ferry/internal/spool"
	"github.com/ferry-tunnel/ferry/proto"
)

const (
	// webhookTargetTimeout bounds one POST to a tunnel's webhook_target.
	webhookTargetTimeout = 30 * time.Second
	// webhookAckTimeout bounds the wait for the agent to close the
	// stream once it has the answer.
	webhookAckTimeout = 10 * time.Second
	// maxWebhookStreams bounds deliveries in flight per agent connection;
	// past it streams are closed and the agent retries.
	maxWebhookStreams = 16
)

// newWebhookClient is the client that POSTs deliveries to targets:
// system roots, the environment's proxy, no redirects (a 3xx is a
// failed delivery, not something to re-POST elsewhere).
func newWebhookClient() *http.Client {
	return &http.Client{
		Transport: &http.Transport{
			Proxy:                 http.ProxyFromEnvironment,
			DialContext:           (&net.Dialer{Timeout: 10 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
			TLSClientConfig:       &tls.Config{MinVersion: tls.VersionTLS12},
			TLSHandshakeTimeout:   10 * time.Second,
			ResponseHeaderTimeout: webhookTargetTimeout,
			MaxIdleConnsPerHost:   4,
			IdleConnTimeout:       90 * time.Second,
		},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// serveWebhook reads one delivery from an agent's stream, POSTs it to the
// tunnel's webhook_target and answers the agent with the target's status
// (502/504 when it could not be reached), so the agent deletes its spooled
// copy only when the target has it.
func (r *Relay) serveWebhook(ctx context.Context, log *slog.Logger, t *tunnel, s *yamux.Stream) {
	defer s.Close()
	s.SetDeadline(time.Now().Add(r.tmo().AgentHandshake))
	hdr, err := proto.ReadHeader(s)
	if err != nil {
		log.Warn("bad stream from agent", "err", err)
		return
	}
	if hdr.Kind != proto.KindWebhook || !httperr.ValidRequestID(hdr.RequestID) {
		log.Warn("agent opened a stream the relay does not serve", "kind", hdr.Kind.String())
		return
	}
	id := hdr.RequestID
	log = log.With("delivery_id", id)
	s.SetDeadline(time.Now().Add(webhookTargetTimeout + 30*time.Second))
	br := bufio.NewReaderSize(s, 16<<10)
	in, err := http.ReadRequest(br)
	if err != nil {
		r.metrics.Webhooks.WithLabelValues(t.id, "bad_request").Inc()
		log.Warn("unreadable webhook delivery from agent", "err", err)
		return
	}
	defer in.Body.Close()
	answer := func(status int, result, msg string, extra http.Header) {
		r.metrics.Webhooks.WithLabelValues(t.id, result).Inc()
		resp := &http.Response{StatusCode: status, ProtoMajor: 1, ProtoMinor: 1, Header: http.Header{},
			Body: io.NopCloser(strings.NewReader(msg)), ContentLength: int64(len(msg)), Close: true}
		resp.Header.Set("Content-Type", "text/plain; charset=utf-8")
		if ra := extra.Get("Retry-After"); ra != "" {
			resp.Header.Set("Retry-After", ra)
		}
		if resp.Write(s) != nil {
			return
		}
		// The agent closes the stream once it has read the answer. Until
		// then the answer may still be queued on its way out, and a
		// relay stopping now would drop it: the agent would send the
		// delivery again, and a target that took it would get it twice.
		s.SetReadDeadline(time.Now().Add(webhookAckTimeout))
		io.Copy(io.Discard, br)
	}
	wt := r.webhookTarget(t.id)
	target := wt.url
	if target == "" {
		log.Warn("webhook delivery for a tunnel without webhook_target; the agent keeps it spooled and retries", "event", in.Header.Get("X-Event-Key"))
		answer(http.StatusNotFound, "no_target", "tunnel "+t.id+" has no webhook_target configured on the relay", nil)
		return
	}
	tctx, cancel := context.WithTimeout(ctx, webhookTargetTimeout)
	defer cancel()
	out, err := http.NewRequestWithContext(tctx, http.MethodPost, target, http.MaxBytesReader(nil, in.Body, spool.MaxBody))
	if err != nil {
		answer(http.StatusBadGateway, "target_unreachable", "bad webhook_target: "+err.Error(), nil)
		return
	}
	out.ContentLength = in.ContentLength
	out.Header = httpx.WebhookHeaders(in.Header)
	out.Header.Set("X-Ferry-Tunnel", t.id)
	out.Header.Set("X-Ferry-Delivery-Id", id)
	if wt.token != nil {
		tok, err := wt.token.Value()
		if err != nil {
			log.Error("cannot read the tunnel's webhook_token_file; the agent keeps the delivery and retries", "err", err)
			answer(http.StatusBadGateway, "target_unreachable", "the relay cannot read this tunnel's webhook_token_file", nil)
			return
		}
		out.Header.Set("Authorization", "Bearer "+tok)
	}
	if rcv := in.Header.Get("X-Ferry-Received"); rcv != "" {
		out.Header.Set("X-Ferry-Received", rcv)
	}
	start := time.Now()
	resp, err := r.webhookClient.Do(out)
	if err != nil {
		if httpx.IsTimeout(err) {
			log.Warn("webhook target did not answer in time", "target", target, "timeout", webhookTargetTimeout.String())
			answer(http.StatusGatewayTimeout, "target_timeout", fmt.Sprintf("webhook target did not answer within %s", webhookTargetTimeout), nil)
			return
		}
		log.Warn("webhook target unreachable", "target", target, "err", err)
		answer(http.StatusBadGateway, "target_unreachable", "cannot reach webhook target: "+err.Error(), nil)
		return
	}
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10)) // let the connection be reused
	resp.Body.Close()
	elapsed := time.Since(start).Round(time.Millisecond).String()
	if resp.StatusCode/100 == 2 {
		log.Info("webhook delivered to target", "event", in.Header.Get("X-Event-Key"), "status", resp.StatusCode, "took", elapsed)
		answer(resp.StatusCode, "delivered", "delivered", nil)
		return
	}
	log.Warn("webhook target refused the delivery; the agent retries", "status", resp.StatusCode, "took", elapsed)
	answer(resp.StatusCode, "target_refused", "webhook target answered "+strconv.Itoa(resp.StatusCode)+": "+strings.TrimSpace(string(snippet)), resp.Header)
}

// startHook counts a webhook delivery in, false once the relay is
// shutting down: the agent sends it again, to the next relay.
func (r *Relay) startHook() bool {
	r.hookMu.Lock()
	defer r.hookMu.Unlock()
	if r.hooksClosed {
		return false
	}
	r.hooks.Add(1)
	return true
}

// webhookTarget is where a tunnel's deliveries go, and with what token.
type webhookTarget struct {
	url   string        // "": none
	token secret.Source // nil: none
}

// webhookTarget is the tunnel's webhook_target in the running config.
func (r *Relay) webhookTarget(tunnel string) webhookTarget {
	return r.auth.Load().webhookTargets[tunnel]
}
