package testrig

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync"
	"time"
)

// RefsChangedPayload is a Bitbucket Data Center repo:refs_changed webhook
// body in Bitbucket's shape; n makes each one distinct.
func RefsChangedPayload(project, slug string, n int) []byte {
	hash := func(i int) string { return fmt.Sprintf("%040x", i) }
	b, _ := json.Marshal(map[string]any{
		"eventKey": "repo:refs_changed",
		"date":     time.Date(2026, 11, 23, 10, 0, n%60, 0, time.UTC).Format("2006-01-02T15:04:05-0700"),
		"actor":    map[string]any{"name": "admin", "emailAddress": "admin@example.com", "id": 1, "displayName": "Administrator", "active": true, "slug": "admin", "type": "NORMAL"},
		"repository": map[string]any{
			"slug": slug, "id": 84, "name": slug, "scmId": "git", "state": "AVAILABLE", "statusMessage": "Available", "forkable": true, "public": false,
			"project": map[string]any{"key": project, "id": 84, "name": project, "public": false, "type": "NORMAL"},
		},
		"changes": []any{map[string]any{
			"ref":   map[string]any{"id": "refs/heads/main", "displayId": "main", "type": "BRANCH"},
			"refId": "refs/heads/main", "fromHash": hash(n), "toHash": hash(n + 1), "type": "UPDATE",
		}},
	})
	return b
}

// SignWebhook is Bitbucket's X-Hub-Signature value for body.
func SignWebhook(secret string, body []byte) string {
	m := hmac.New(sha256.New, []byte(secret))
	m.Write(body)
	return "sha256=" + hex.EncodeToString(m.Sum(nil))
}

// WebhookPost builds the request Bitbucket DC sends for a webhook.
func WebhookPost(url, event, secret string, body []byte) *http.Request {
	req, err := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		panic(err)
	}
	req.Header.Set("Content-Type", "application/json; charset=utf-8")
	req.Header.Set("User-Agent", "Atlassian HttpClient 4.2.0 / Bitbucket-9.4.0 / Default")
	req.Header.Set("X-Event-Key", event)
	req.Header.Set("X-Request-Id", fmt.Sprintf("%x", sha256.Sum256(body))[:36])
	if secret != "" {
		req.Header.Set("X-Hub-Signature", SignWebhook(secret, body))
	}
	return req
}

// Received is one POST a WebhookTarget got.
type Received struct {
	DeliveryID string
	Header     http.Header
	Body       []byte
	Status     int // what the target answered
}

// WebhookTarget is a cloud endpoint that records every POST. FailNext
// makes it answer 503 to the next n attempts; Down makes it answer 503
// until cleared.
type WebhookTarget struct {
	mu       sync.Mutex
	got      []Received
	failNext int
	down     bool
	hold     chan struct{} // non-nil: answers wait until it is closed
	token    string        // non-empty: POSTs without "Authorization: Bearer <token>" get 401
}

// RequireToken makes the target answer 401 to POSTs that do not carry
// "Authorization: Bearer tok" ("" accepts any).
func (t *WebhookTarget) RequireToken(tok string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.token = tok
}

// HoldAnswers makes every POST wait, recorded, for its answer until
// release is called: a target that has a delivery and is slow to say so.
func (t *WebhookTarget) HoldAnswers() (release func()) {
	t.mu.Lock()
	defer t.mu.Unlock()
	hold := make(chan struct{})
	t.hold = hold
	return sync.OnceFunc(func() {
		t.mu.Lock()
		t.hold = nil
		t.mu.Unlock()
		close(hold)
	})
}

// FailNext makes the next n POSTs fail with 503.
func (t *WebhookTarget) FailNext(n int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.failNext = n
}

// SetDown makes every POST fail with 503 while down.
func (t *WebhookTarget) SetDown(down bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.down = down
}

// All is every POST so far, failed ones included.
func (t *WebhookTarget) All() []Received {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]Received(nil), t.got...)
}

// Delivered is the POSTs answered 2xx, first copy of each delivery id only.
func (t *WebhookTarget) Delivered() []Received {
	seen := map[string]bool{}
	var out []Received
	for _, r := range t.All() {
		if r.Status/100 == 2 && !seen[r.DeliveryID] {
			seen[r.DeliveryID] = true
			out = append(out, r)
		}
	}
	return out
}

func (t *WebhookTarget) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	t.mu.Lock()
	status := http.StatusNoContent
	switch {
	case t.token != "" && r.Header.Get("Authorization") != "Bearer "+t.token:
		status = http.StatusUnauthorized
	case t.down:
		status = http.StatusServiceUnavailable
	case t.failNext > 0:
		t.failNext--
		status = http.StatusServiceUnavailable
	}
	t.got = append(t.got, Received{DeliveryID: r.Header.Get("X-Ferry-Delivery-Id"), Header: r.Header.Clone(), Body: body, Status: status})
	hold := t.hold
	t.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-r.Context().Done():
			return
		}
	}
	switch status {
	case http.StatusNoContent:
	case http.StatusUnauthorized:
		http.Error(w, "bad or missing token", status)
		return
	default:
		http.Error(w, "target temporarily unavailable", status)
		return
	}
	w.WriteHeader(status)
}
