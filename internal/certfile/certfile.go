// Package certfile serves the TLS certificate held in a pair of PEM files
// and loads it again when the files change (cert-manager, certbot), so a
// renewal needs no restart.
package certfile

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-tunnel/ferry/internal/readfile"
)

// maxPEM bounds a certificate chain or key file.
const maxPEM = 1 << 20

// Source is a certificate and key pair read from files.
type Source struct {
	CertFile, KeyFile string

	cert atomic.Pointer[tls.Certificate]

	mu              sync.Mutex // serialises Reload
	certPEM, keyPEM []byte     // what cert was made of
	problem         string     // the last Reload's error, "" if none
}

// Load reads the pair; it fails if the files do not hold one.
func Load(certFile, keyFile string) (*Source, error) {
	s := &Source{CertFile: certFile, KeyFile: keyFile}
	if _, err := s.Reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Reload reads the files again and serves the pair they hold; changed is
// false when it is the one already served. On an error (the certificate
// renewed but not yet its key, say) the served certificate stays.
func (s *Source) Reload() (changed bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed, err = s.reload()
	if err != nil {
		s.problem = err.Error()
	} else {
		s.problem = ""
	}
	return changed, err
}

func (s *Source) reload() (bool, error) {
	certPEM, err := readfile.Regular(s.CertFile, maxPEM)
	if err != nil {
		return false, fmt.Errorf("load certificate: %w", err)
	}
	keyPEM, err := readfile.Regular(s.KeyFile, maxPEM)
	if err != nil {
		return false, fmt.Errorf("load certificate key: %w", err)
	}
	if bytes.Equal(certPEM, s.certPEM) && bytes.Equal(keyPEM, s.keyPEM) {
		return false, nil
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return false, fmt.Errorf("load certificate %s: %w", s.CertFile, err)
	}
	s.cert.Store(&cert)
	s.certPEM, s.keyPEM = certPEM, keyPEM
	return true, nil
}

// Check is Reload for a caller that reports what it finds: err is
// returned only when it differs from the last one, so that files left
// half-renewed are reported once, not at every look.
func (s *Source) Check() (renewed bool, err error) {
	s.mu.Lock()
	before := s.problem
	s.mu.Unlock()
	renewed, err = s.Reload()
	if err != nil && err.Error() == before {
		return false, nil
	}
	return renewed, err
}

// Problem is the error of the last look at the files, "" if they loaded.
func (s *Source) Problem() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.problem
}

// GetCertificate is for tls.Config: the pair served now.
func (s *Source) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.cert.Load(), nil
}

// NotAfter is when the served certificate expires.
func (s *Source) NotAfter() time.Time {
	if leaf := s.cert.Load().Leaf; leaf != nil {
		return leaf.NotAfter
	}
	return time.Time{}
}

// ServerConfig serves s's certificate, TLS 1.2 and up.
func (s *Source) ServerConfig() *tls.Config {
	return &tls.Config{GetCertificate: s.GetCertificate, MinVersion: tls.VersionTLS12}
}

// CheckEvery is how often the daemons look at certificate files for a
// renewal.
const CheckEvery = time.Minute

// Watch calls check every interval until ctx ends: the loop each daemon
// runs over its certificates (check calls Check and logs what it finds).
func Watch(ctx context.Context, every time.Duration, check func()) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			check()
		}
	}
}

// ExpiryWarning: a certificate loaded with less than this left is logged
// as a warning (and shown in red).
const ExpiryWarning = 14 * 24 * time.Hour

// DaysLeft is the whole days until notAfter.
func DaysLeft(notAfter time.Time) int { return int(time.Until(notAfter).Hours() / 24) }

// Urgency is how a line about a certificate expiring at notAfter should
// read: info while it has ExpiryWarning left, else a warning, an error
// once expired, with what to do.
func Urgency(notAfter time.Time) (level slog.Level, advice string) {
	switch left := time.Until(notAfter); {
	case left <= 0:
		return slog.LevelError, "it has EXPIRED: clients refuse it; renew it"
	case left < ExpiryWarning:
		return slog.LevelWarn, "it expires soon: renew it"
	}
	return slog.LevelInfo, ""
}
