package agent

import (
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/metrics"
	"github.com/ferry-tunnel/ferry/internal/secret"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func newTestWebhooks(t *testing.T, cfg config.Webhooks) *webhooks {
	t.Helper()
	cfg.Listen = "127.0.0.1:0"
	if cfg.SpoolDir == "" {
		cfg.SpoolDir = filepath.Join(t.TempDir(), "spool")
	}
	cfg.MaxBodyKB = max(cfg.MaxBodyKB, 1)
	cfg.SpoolMaxMB = max(cfg.SpoolMaxMB, 1)
	cfg.SpoolMaxCount = max(cfg.SpoolMaxCount, 1)
	cfg.Lanes = 2
	w, err := openWebhooks(cfg, slog.New(slog.DiscardHandler), metrics.NewAgent())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.ln.Close() })
	return w
}

func post(w *webhooks, secretKey string, body []byte) *httptest.ResponseRecorder {
	rec := httptest.NewRecorder()
	w.ServeHTTP(rec, testrig.WebhookPost("http://agent/", "repo:refs_changed", secretKey, body))
	return rec
}

func TestWebhookSpoolFullAnswers503AndKeepsWhatItHas(t *testing.T) {
	w := newTestWebhooks(t, config.Webhooks{SpoolMaxCount: 2, MaxBodyKB: 64})
	for i := range 2 {
		if rec := post(w, "", testrig.RefsChangedPayload("PROJ", "app", i)); rec.Code != http.StatusAccepted {
			t.Fatalf("delivery %d: %d %s", i, rec.Code, rec.Body)
		}
	}
	rec := post(w, "", testrig.RefsChangedPayload("PROJ", "app", 3))
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" || !strings.Contains(rec.Body.String(), "spool is full") {
		t.Fatalf("full spool answered %d %q (Retry-After %q); want 503 so Bitbucket retries", rec.Code, rec.Body, rec.Header().Get("Retry-After"))
	}
	if st := w.spool.Stats(); st.Spooled != 2 {
		t.Fatalf("spool holds %d, want the 2 accepted", st.Spooled)
	}
	big := make([]byte, 65<<10)
	if rec := post(w, "", big); rec.Code != http.StatusRequestEntityTooLarge {
		t.Fatalf("oversize body: %d, want 413", rec.Code)
	}
	get := httptest.NewRecorder()
	w.ServeHTTP(get, httptest.NewRequest(http.MethodGet, "/", nil))
	if get.Code != http.StatusMethodNotAllowed {
		t.Fatalf("GET: %d, want 405", get.Code)
	}
}

func TestWebhookSignature(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "secret")
	if err := os.WriteFile(path, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	src, err := secret.NewFile(path)
	if err != nil {
		t.Fatal(err)
	}
	w := newTestWebhooks(t, config.Webhooks{Secret: src, MaxBodyKB: 64})
	body := testrig.RefsChangedPayload("PROJ", "app", 1)
	for name, hdr := range map[string]string{
		"missing":      "",
		"wrong secret": testrig.SignWebhook("other", body),
		"sha1":         "sha1=" + strings.TrimPrefix(testrig.SignWebhook("s3cret", body), "sha256="),
		"not hex":      "sha256=zz",
		"truncated":    testrig.SignWebhook("s3cret", body)[:20],
	} {
		req := testrig.WebhookPost("http://agent/", "repo:refs_changed", "", body)
		if hdr != "" {
			req.Header.Set("X-Hub-Signature", hdr)
		}
		rec := httptest.NewRecorder()
		w.ServeHTTP(rec, req)
		if rec.Code != http.StatusUnauthorized {
			t.Errorf("%s signature: %d, want 401", name, rec.Code)
		}
	}
	if rec := post(w, "s3cret", body); rec.Code != http.StatusAccepted {
		t.Fatalf("good signature: %d %s", rec.Code, rec.Body)
	}
	if st := w.spool.Stats(); st.Spooled != 1 {
		t.Fatalf("spool holds %d; refused deliveries must not be spooled", st.Spooled)
	}
}

func TestRepoOf(t *testing.T) {
	cases := map[string]string{
		string(testrig.RefsChangedPayload("OPS", "deploy-tools", 1)):                                              "OPS/deploy-tools",
		`{"eventKey":"pr:opened","pullRequest":{"toRef":{"repository":{"slug":"app","project":{"key":"PROJ"}}}}}`: "PROJ/app",
		`{"eventKey":"diagnostics:ping","test":true}`:                                                             "",
		`not json`: "",
	}
	for body, want := range cases {
		if got := repoOf([]byte(body)); got != want {
			t.Errorf("repoOf(%.40s…) = %q, want %q", body, got, want)
		}
	}
}

// A relay's Retry-After is obeyed up to five minutes, whatever it says.
func TestRetryAfterIsBounded(t *testing.T) {
	for v, want := range map[string]time.Duration{
		"":                     0,
		"soon":                 0,
		"-3":                   0,
		"0":                    0,
		"7":                    7 * time.Second,
		"300":                  5 * time.Minute,
		"86400":                5 * time.Minute,
		"9223372036854775807":  5 * time.Minute, // wrapped negative when multiplied
		"18446744073709551617": 0,               // not an int: ignored
	} {
		h := http.Header{}
		if v != "" {
			h.Set("Retry-After", v)
		}
		if got := retryAfter(h); got != want {
			t.Errorf("Retry-After %q: waits %v, want %v", v, got, want)
		}
	}
}

// When the spool's disk is full, Bitbucket is told to come back (503 and
// Retry-After, as for a full spool), not that the delivery is broken; once
// there is room the next delivery is taken.
func TestWebhookOnFullDiskAnswers503(t *testing.T) {
	disk := testrig.SmallDisk(t, 256<<10)
	w := newTestWebhooks(t, config.Webhooks{SpoolDir: filepath.Join(disk, "spool"), MaxBodyKB: 64, SpoolMaxCount: 10})
	if rec := post(w, "", testrig.RefsChangedPayload("PROJ", "app", 1)); rec.Code != http.StatusAccepted {
		t.Fatalf("first delivery: %d %s", rec.Code, rec.Body)
	}
	filler := testrig.FillDisk(t, disk)
	rec := post(w, "", testrig.RefsChangedPayload("PROJ", "app", 2))
	if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" || !strings.Contains(rec.Body.String(), "disk is full") {
		t.Fatalf("delivery on a full disk answered %d %q (Retry-After %q); want 503 saying the disk is full", rec.Code, rec.Body, rec.Header().Get("Retry-After"))
	}
	if st := w.spool.Stats(); st.Spooled != 1 {
		t.Fatalf("spool counts %d deliveries, want the 1 accepted", st.Spooled)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if rec := post(w, "", testrig.RefsChangedPayload("PROJ", "app", 2)); rec.Code != http.StatusAccepted {
		t.Fatalf("delivery once there is room: %d %s", rec.Code, rec.Body)
	}
}
