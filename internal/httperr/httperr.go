// Package httperr writes ferry's JSON error bodies and carries the request
// id header that ties a scanner's response to both sides' logs.
package httperr

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"

	"github.com/ferry-tunnel/ferry/internal/httpx"
)

// RequestIDHeader is on every response ferry gives a scanner.
const RequestIDHeader = "X-Ferry-Request-Id"

// Error codes of the scanner API (SPEC "Scanner API").
const (
	Unauthorized    = "unauthorized"
	Forbidden       = "forbidden"
	PolicyDenied    = "policy_denied"
	UnknownTunnel   = "unknown_tunnel"
	UnknownUpstream = "unknown_upstream"
	TunnelOffline   = "tunnel_offline"
	TunnelBusy      = "tunnel_busy"
	UpstreamBusy    = "upstream_busy"
	UpstreamError   = "upstream_error"
	UpstreamTimeout = "upstream_timeout"
	BadRequest      = "bad_request"
	TooManyRequests = "too_many_requests"
	NotFound        = "not_found"
)

// Body is the JSON error shape.
type Body struct {
	Error     string `json:"error"`
	Message   string `json:"message"`
	RequestID string `json:"request_id,omitempty"`
}

// Write sends a JSON error. The request id is taken from the response
// headers, where every handler sets it first.
func Write(w http.ResponseWriter, status int, code, msg string) {
	h := w.Header()
	h.Set("X-Ferry-Error", code)
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	b, _ := json.Marshal(Body{Error: code, Message: msg, RequestID: h.Get(RequestIDHeader)})
	b = append(b, '\n')
	// Declared, so the answer can leave before the log line (see
	// httpx.Recorder.SendIfComplete).
	h.Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

// Respond writes an error in the form the client reads best: plain text
// for git (which shows it to its user as "remote: ..." lines), JSON for
// everything else. The code is also in the X-Ferry-Error header.
func Respond(w http.ResponseWriter, r *http.Request, status int, code, msg string) {
	w.Header().Set("X-Ferry-Error", code)
	if httpx.IsGit(r) {
		h := w.Header()
		h.Set("Content-Type", "text/plain; charset=utf-8")
		h.Set("Cache-Control", "no-store")
		b := fmt.Appendf(nil, "ferry: %s: %s (request %s)\n", code, msg, h.Get(RequestIDHeader))
		h.Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(status)
		w.Write(b)
		return
	}
	Write(w, status, code, msg)
}

// NewRequestID returns 16 random hex characters.
func NewRequestID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// ValidRequestID reports whether id looks like one ferry made: it comes
// from the other side of the tunnel and ends up in logs and headers.
func ValidRequestID(id string) bool {
	if len(id) < 8 || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}
