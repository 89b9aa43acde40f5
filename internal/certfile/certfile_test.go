package certfile

import (
	"bytes"
	"log/slog"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func TestRenewalAndHalfRenewedFiles(t *testing.T) {
	old, err := testrig.NewPKIFor(t.TempDir(), 90*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	renewed, err := testrig.NewPKIFor(t.TempDir(), 10*24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Load(old.CertFile, old.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	served := func() []byte {
		c, _ := s.GetCertificate(nil)
		return c.Certificate[0]
	}
	if !s.NotAfter().Equal(old.Cert.Leaf.NotAfter) || !bytes.Equal(served(), old.Cert.Certificate[0]) {
		t.Fatal("not serving the files' certificate")
	}
	if renewed, err := s.Check(); renewed || err != nil {
		t.Fatalf("unchanged files: renewed %v, %v", renewed, err)
	}

	// The certificate is renewed first, its key a moment later.
	if err := testrig.ReplaceFile(renewed.CertFile, old.CertFile); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Check(); err == nil || !strings.Contains(err.Error(), "private key does not match") {
		t.Fatalf("half-renewed files: %v", err)
	}
	if _, err := s.Check(); err != nil {
		t.Fatalf("the same problem reported twice: %v", err)
	}
	if s.Problem() == "" || !bytes.Equal(served(), old.Cert.Certificate[0]) {
		t.Fatalf("half-renewed files: problem %q, or the served certificate changed", s.Problem())
	}

	if err := testrig.ReplaceFile(renewed.KeyFile, old.KeyFile); err != nil {
		t.Fatal(err)
	}
	if ok, err := s.Check(); !ok || err != nil {
		t.Fatalf("renewed files: renewed %v, %v", ok, err)
	}
	if s.Problem() != "" || !bytes.Equal(served(), renewed.Cert.Certificate[0]) || !s.NotAfter().Equal(renewed.Cert.Leaf.NotAfter) {
		t.Fatal("the renewed certificate is not served")
	}

	os.Remove(old.KeyFile)
	if _, err := s.Check(); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Fatalf("key file gone: %v", err)
	}
	if !bytes.Equal(served(), renewed.Cert.Certificate[0]) {
		t.Fatal("a missing key file replaced the served certificate")
	}
	if _, err := Load(old.CertFile, old.KeyFile); err == nil {
		t.Fatal("Load took a pair without its key")
	}
}

func TestUrgency(t *testing.T) {
	for _, c := range []struct {
		validity time.Duration
		level    slog.Level
		advice   string
	}{
		{90 * 24 * time.Hour, slog.LevelInfo, ""},
		{10 * 24 * time.Hour, slog.LevelWarn, "expires soon"},
		{-30 * time.Minute, slog.LevelError, "EXPIRED"},
	} {
		pki, err := testrig.NewPKIFor(t.TempDir(), c.validity)
		if err != nil {
			t.Fatal(err)
		}
		s, err := Load(pki.CertFile, pki.KeyFile)
		if err != nil {
			t.Fatal(err)
		}
		if level, advice := Urgency(s.NotAfter()); level != c.level || !strings.Contains(advice, c.advice) {
			t.Errorf("valid for %v: %v %q, want %v %q", c.validity, level, advice, c.level, c.advice)
		}
	}
}
