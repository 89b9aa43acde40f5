package httperr

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
)

// Errors declare their length, so that an answer can leave before the
// daemon's log line (httpx.Recorder.SendIfComplete).
func TestErrorsDeclareTheirLength(t *testing.T) {
	for _, tc := range []struct {
		name, path, userAgent, contentType string
	}{
		{"json", "/rest/api/1.0/projects", "scanner/1.0", "application/json"},
		{"git", "/scm/proj/app.git/info/refs?service=git-upload-pack", "git/2.39.5", "text/plain; charset=utf-8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest("GET", tc.path, nil)
			r.Header.Set("User-Agent", tc.userAgent)
			w := httptest.NewRecorder()
			w.Header().Set(RequestIDHeader, "0123456789abcdef")
			Respond(w, r, http.StatusForbidden, PolicyDenied, "push is not allowed by profile bitbucket-dc-read")
			body := w.Body.String()
			if got := w.Header().Get("Content-Length"); got != strconv.Itoa(len(body)) {
				t.Errorf("Content-Length %q for a body of %d bytes", got, len(body))
			}
			if got := w.Header().Get("Content-Type"); got != tc.contentType {
				t.Errorf("Content-Type %q, want %q", got, tc.contentType)
			}
			if w.Code != http.StatusForbidden || !strings.Contains(body, "0123456789abcdef") {
				t.Errorf("got %d %q", w.Code, body)
			}
			if tc.name == "json" {
				var b Body
				if err := json.Unmarshal(w.Body.Bytes(), &b); err != nil || b.Error != PolicyDenied {
					t.Errorf("body %q: %v", body, err)
				}
			}
		})
	}
}
