package main

import (
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// benchPAT is the upstream's token, which the agent adds.
const benchPAT = "bench-pat"

// upstreamFlag, as the bench's first argument, makes it the upstream: a
// process of its own, as Bitbucket is, so that the direct client does
// not share a Go runtime with the server it measures (in one process a
// request and its answer cross between goroutines, never between
// processes, which no real deployment has). The next arguments are the
// certificate's and key's files and the git repositories' directory.
const upstreamFlag = "-serve-upstream"

// startUpstream runs the upstream as a child process.
func (s *setup) startUpstream() error {
	c, err := startChild(upstreamFlag, s.pki.CertFile, s.pki.KeyFile, s.gitRoot())
	if err != nil {
		return err
	}
	s.upstreamProc = c
	s.upstream = "https://" + c.addr
	return nil
}

// serveUpstream is the child's main: the bench's endpoints and a
// Bitbucket stand-in over TLS, until stdin closes.
func serveUpstream(certFile, keyFile, gitRoot string) error {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return fmt.Errorf("load the certificate: %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: upstreamMux(gitRoot), ReadHeaderTimeout: 10 * time.Second,
		TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}}
	done := make(chan error, 1)
	go func() { done <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-done:
		return err
	case <-announce(ln.Addr().String()):
		srv.Close()
		<-done
		return nil
	}
}

func upstreamMux(gitRoot string) *http.ServeMux {
	bb := &testrig.Bitbucket{GitRoot: gitRoot, Token: benchPAT, User: "svc-bench"}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /bench/blob", func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
		w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
		io.CopyBuffer(w, &repeatReader{left: n}, make([]byte, 256<<10))
	})
	mux.HandleFunc("POST /bench/sink", func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.CopyBuffer(io.Discard, r.Body, make([]byte, 256<<10))
		fmt.Fprintf(w, "%d\n", n)
	})
	mux.HandleFunc("GET /bench/slow", func(w http.ResponseWriter, r *http.Request) {
		ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
			w.Write([]byte("slow\n"))
		case <-r.Context().Done():
		}
	})
	small := []byte(strings.Repeat("x", 100))
	mux.HandleFunc("GET /bench/small", func(w http.ResponseWriter, r *http.Request) { w.Write(small) })
	mux.Handle("/", bb)
	return mux
}

// gitRoot is where the upstream serves git repositories from.
func (s *setup) gitRoot() string { return filepath.Join(s.dir, "git") }
