package agent

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/spool"
	"github.com/ferry-tunnel/ferry/proto"
)

const (
	// webhookSendTimeout bounds one forwarding attempt; the relay gives
	// the target 30 s.
	webhookSendTimeout = 60 * time.Second
	// webhookRetryMax caps the wait between attempts at one delivery.
	webhookRetryMax = time.Minute
)

// runLane forwards the lane's deliveries one at a time, in order: the head
// is retried until the relay confirms the target took it, and only then
// removed from the spool and the lane.
func (w *webhooks) runLane(ctx context.Context, l *lane, a *Agent) {
	b := &backoff{base: time.Second, max: webhookRetryMax}
	for {
		e, ok := l.head(ctx)
		if !ok {
			return
		}
		d, err := w.spool.Read(e)
		if err != nil {
			// Quarantined (corrupt) or gone: reported by the spool; the
			// rest of the lane goes on.
			w.noteError(err.Error())
			l.pop()
			continue
		}
		log := w.log.With("delivery_id", d.ID, "event", d.Event, "repo", d.Repo)
		for attempt := 1; ; attempt++ {
			sess := a.waitSession(ctx)
			if sess == nil {
				return // shutting down; the delivery stays spooled
			}
			status, msg, hint, err := w.send(ctx, sess, d)
			if ctx.Err() != nil {
				return
			}
			if err == nil && status/100 == 2 {
				if rerr := w.spool.Remove(e); rerr != nil {
					log.Error("webhook delivered but its spool file could not be removed; it may be sent again after a restart", "err", rerr)
				}
				l.pop()
				b.reset()
				w.metrics.WebhookForwarded.Inc()
				w.mu.Lock()
				w.forwarded++
				w.lastSent = time.Now()
				w.mu.Unlock()
				log.Info("webhook delivered", "target_status", status, "attempts", attempt, "age", time.Since(d.Received).Round(time.Millisecond).String())
				break
			}
			problem := msg
			if err != nil {
				problem = err.Error()
			}
			delay := max(b.next(), hint)
			w.metrics.WebhookRetries.Inc()
			w.noteError(fmt.Sprintf("delivery %s: %s", d.ID, problem))
			log.Warn("webhook not delivered yet; will retry", "attempt", attempt, "status", status, "problem", problem, "retry_in", delay.Round(time.Millisecond).String())
			if !sleep(ctx, delay, nil) {
				return
			}
		}
	}
}

// waitSession returns a live relay session, waiting for one while the
// relay is unreachable; nil once ctx ends. Slots are tried in turn so
// deliveries spread over the connections.
func (a *Agent) waitSession(ctx context.Context) *yamux.Session {
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		slots := a.slots.all()
		n := len(slots)
		start := int(a.nextSlot.Add(1))
		for i := range n {
			if s := slots[(start+i)%n].session(); s != nil {
				return s
			}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			return nil
		}
	}
}

// send makes one forwarding attempt: a webhook stream to the relay
// carrying the delivery as an HTTP request; the relay answers with the
// target's status (or 502/504 when it could not reach it). hint is the
// relay's Retry-After.
func (w *webhooks) send(ctx context.Context, sess *yamux.Session, d spool.Delivery) (status int, msg string, hint time.Duration, err error) {
	s, err := sess.OpenStream()
	if err != nil {
		return 0, "", 0, fmt.Errorf("open webhook stream: %w", err)
	}
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	s.SetDeadline(time.Now().Add(webhookSendTimeout))
	if err := proto.WriteHeader(s, proto.Header{Kind: proto.KindWebhook, RequestID: d.ID}); err != nil {
		return 0, "", 0, err
	}
	// The relay POSTs to the tunnel's webhook_target; the path here is not used.
	req, err := http.NewRequest(http.MethodPost, "http://tunnel/", bytes.NewReader(d.Body))
	if err != nil {
		return 0, "", 0, err
	}
	req.Header = d.Header.Clone()
	req.Header.Set("X-Ferry-Received", d.Received.Format(time.RFC3339Nano))
	bw := bufio.NewWriter(s)
	if err := req.Write(bw); err != nil {
		return 0, "", 0, fmt.Errorf("send webhook to relay: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return 0, "", 0, fmt.Errorf("send webhook to relay: %w", err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(s), req)
	if err != nil {
		return 0, "", 0, fmt.Errorf("read relay's answer: %w", err)
	}
	// Not resp.Body.Close: on a ReadResponse body it reads to the end,
	// which a relay could make long; closing the stream (deferred) ends it.
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
	msg = strings.TrimSpace(string(b))
	if msg == "" {
		msg = resp.Status
	}
	return resp.StatusCode, fmt.Sprintf("relay answered %d: %s", resp.StatusCode, msg), retryAfter(resp.Header), nil
}
