package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/internal/token"
)

// servedLeaf is the certificate a TLS handshake with addr presents.
func servedLeaf(t *testing.T, addr string) []byte {
	t.Helper()
	c, err := tls.Dial("tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].Raw
}

// TestRenewedCertificateFilesAreServed: certificate files renewed in
// place (cert-manager, certbot) are served to new connections without a
// SIGHUP; a pair that does not load (the certificate written, its key not
// yet) leaves the current certificate served, and says so once.
func TestRenewedCertificateFilesAreServed(t *testing.T) {
	dir := t.TempDir()
	old, err := testrig.NewPKIFor(filepath.Join(dir), 90*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	renewed, err := testrig.NewPKIFor(t.TempDir(), 10*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.ParseRelay(filepath.Join(dir, "relay.yaml"), []byte(`agent_listen: "127.0.0.1:0"
tls: {cert_file: `+old.CertFile+`, key_file: `+old.KeyFile+`}
scanner_listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
tunnels: [{id: t, agent_tokens: ["`+token.Of("agent-token").String()+`"]}]
scanners: [{name: s, token: "`+token.Of("scanner-token").String()+`", tunnels: [t]}]
`))
	if err != nil {
		t.Fatal(err)
	}
	var logs testrig.LogBuffer
	r, err := New(cfg, slog.New(slog.NewJSONHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Listen(); err != nil {
		t.Fatal(err)
	}
	r.certCheck = 20 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Serve(ctx) }()
	defer func() {
		cancel()
		<-done
	}()

	expiry := func() float64 { return testutil.ToFloat64(r.metrics.CertExpiry.WithLabelValues("agent")) }
	waitFor(t, "the expiry metric", func() bool { return expiry() != 0 })
	if got, want := int64(expiry()), old.Cert.Leaf.NotAfter.Unix(); got != want {
		t.Fatalf("expiry metric %d, want %d", got, want)
	}
	if !bytes.Equal(servedLeaf(t, r.AgentAddr()), old.Cert.Certificate[0]) {
		t.Fatal("not serving the configured certificate")
	}

	// The renewed certificate lands first, its key a moment later.
	if err := testrig.ReplaceFile(renewed.CertFile, old.CertFile); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the half-written pair reported", func() bool {
		return strings.Contains(logs.String(), "TLS certificate files do not load; still serving the current certificate")
	})
	if !bytes.Equal(servedLeaf(t, r.AgentAddr()), old.Cert.Certificate[0]) {
		t.Fatal("a pair that does not load replaced the served certificate")
	}
	time.Sleep(100 * time.Millisecond) // several more looks
	if n := strings.Count(logs.String(), "do not load"); n != 1 {
		t.Fatalf("a lasting load error logged %d times, want once", n)
	}
	if err := testrig.ReplaceFile(renewed.KeyFile, old.KeyFile); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the renewed certificate served", func() bool {
		return bytes.Equal(servedLeaf(t, r.AgentAddr()), renewed.Cert.Certificate[0])
	})
	if got, want := int64(expiry()), renewed.Cert.Leaf.NotAfter.Unix(); got != want {
		t.Fatalf("expiry metric %d after renewal, want %d", got, want)
	}
	l := logs.String()
	if !strings.Contains(l, `"msg":"TLS certificate renewed; new connections get it; it expires soon: renew it"`) ||
		!strings.Contains(l, `"why":"files changed"`) || !strings.Contains(l, `"level":"WARN"`) {
		t.Fatalf("renewal not logged as expected:\n%s", l)
	}
}
