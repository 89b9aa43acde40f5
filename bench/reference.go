package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/yamux"
)

// Reference tunnels put the small-request figures in scale on the machine
// at hand: four stand-ins of ferry's shape (an entry process the client
// talks plain HTTP to, TLS between it and an exit process, TLS from there
// to the upstream), each doing less than ferry must:
//
//   - pipe: two byte forwarders, a TLS connection between them for each
//     client connection. No multiplexing, no HTTP: the least any
//     two-process tunnel costs here.
//   - yamux: the same over one TLS connection, a yamux stream for each
//     client connection: the least a tunnel multiplexed on yamux costs.
//   - proxies: two stock httputil.ReverseProxy servers on http.Transport,
//     what a tunnel that reads HTTP and is built from the standard parts
//     costs.
//   - proxies-yamux: the same with the entry's requests on yamux streams
//     of one TLS connection (http.Transport dialling a stream), the exit
//     serving them: ferry's design from stock parts, without its policy,
//     logs, metrics and WebSocket.
//
// Ferry reads every request (the agent judges it and adds the
// credential), so it can do no better than the yamux pipe and should do
// better than the stock proxies. The ends run as children of the bench,
// like the upstream.
const referenceFlag = "-serve-reference"

type referenceKind struct {
	name string // the roles' prefix
	what string
}

func referenceKinds() []referenceKind {
	return []referenceKind{
		{"pipe", "two byte forwarders, a TLS connection between them per client connection"},
		{"yamux", "two byte forwarders, a yamux stream per client connection on one TLS connection"},
		{"proxies", "two httputil.ReverseProxy servers with http.Transport, TLS between"},
		{"proxies-yamux", "the same two proxies, the entry's requests on yamux streams of one TLS connection"},
	}
}

// Reference is one reference tunnel's figures, in results.json.
type Reference struct {
	Tunnel string `json:"tunnel"`
	What   string `json:"what"`
	// SmallGETs is the median of the rounds, 64 concurrent clients, as
	// the small-GETs workload; Direct the median of the direct runs
	// alternating with them.
	SmallGETs float64 `json:"small_gets_per_s"`
	Direct    float64 `json:"direct_per_s"`
	Ratio     float64 `json:"ratio"`
	// CPU per request under that load, of each end.
	EntryCPU float64 `json:"entry_cpu_us"`
	ExitCPU  float64 `json:"exit_cpu_us"`
	// AddedP50 is one client's median, less direct's, in ms; the CPU
	// per request of each end at that load.
	AddedP50       float64 `json:"added_p50_ms"`
	EntryCPUSerial float64 `json:"entry_cpu_one_client_us"`
	ExitCPUSerial  float64 `json:"exit_cpu_one_client_us"`
}

// references measures the reference tunnels with the small-GETs and
// latency workloads: in each round direct, then each tunnel, as the
// workloads alternate direct and ferry.
func (s *setup) references(workers int, dur time.Duration, n int) ([]Reference, error) {
	type tunnel struct {
		kind        referenceKind
		entry, exit *child
		client      *http.Client
		rates       []float64
		cpu         [2]time.Duration
		served      int64
	}
	var tunnels []*tunnel
	defer func() {
		for _, t := range tunnels {
			t.entry.stop()
			t.exit.stop()
			t.client.CloseIdleConnections()
		}
	}()
	for _, k := range referenceKinds() {
		exit, err := startChild(referenceFlag, k.name+"-exit", s.upstreamProc.addr, s.pki.CertFile, s.pki.KeyFile, s.pki.CAFile)
		if err != nil {
			return nil, err
		}
		entry, err := startChild(referenceFlag, k.name+"-entry", exit.addr, s.pki.CertFile, s.pki.KeyFile, s.pki.CAFile)
		if err != nil {
			exit.stop()
			return nil, err
		}
		tunnels = append(tunnels, &tunnel{kind: k, entry: entry, exit: exit,
			client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256, DisableCompression: true}}})
	}
	var direct []float64
	for i := 0; i < s.rounds; i++ {
		d, _, err := s.load(s.direct, s.directURL("/bench/small"), workers, dur)
		if err != nil {
			return nil, fmt.Errorf("direct: %w", err)
		}
		direct = append(direct, d)
		for _, t := range tunnels {
			c0, x0 := procCPU(t.entry.pid()), procCPU(t.exit.pid())
			rate, served, err := s.load(t.client, "http://"+t.entry.addr+"/bench/small", workers, dur)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", t.kind.name, err)
			}
			t.cpu[0] += procCPU(t.entry.pid()) - c0
			t.cpu[1] += procCPU(t.exit.pid()) - x0
			t.served += served
			t.rates = append(t.rates, rate)
		}
	}
	d, err := s.p50(s.direct, s.directURL("/bench/small"), n)
	if err != nil {
		return nil, fmt.Errorf("direct: %w", err)
	}
	var out []Reference
	dm := median(direct)
	for _, t := range tunnels {
		c0, x0 := procCPU(t.entry.pid()), procCPU(t.exit.pid())
		p, err := s.p50(t.client, "http://"+t.entry.addr+"/bench/small", n)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", t.kind.name, err)
		}
		serial := func(c time.Duration) float64 { return float64(c.Microseconds()) / float64(n+warmUp) }
		per := func(c time.Duration) float64 { return float64(c.Microseconds()) / float64(max(t.served, 1)) }
		r := Reference{Tunnel: t.kind.name, What: t.kind.what, SmallGETs: median(t.rates), Direct: dm,
			EntryCPU: per(t.cpu[0]), ExitCPU: per(t.cpu[1]), AddedP50: float64((p - d).Microseconds()) / 1000,
			EntryCPUSerial: serial(procCPU(t.entry.pid()) - c0), ExitCPUSerial: serial(procCPU(t.exit.pid()) - x0)}
		if dm > 0 {
			r.Ratio = r.SmallGETs / dm
		}
		out = append(out, r)
	}
	return out, nil
}

// p50 is the median time of n sequential small GETs (after the warm-up).
func (s *setup) p50(c *http.Client, url string, n int) (time.Duration, error) {
	xs, err := s.sequential(c, url, n, http.StatusOK)
	if err != nil {
		return 0, err
	}
	return xs[len(xs)/2], nil
}

func printReferences(refs []Reference, results []Result) {
	if len(refs) == 0 {
		return
	}
	fmt.Printf("\nreference tunnels on this machine (not ferry): small GETs, 64 concurrent, and one client's added p50\n")
	fmt.Printf("%-14s %10s %8s %22s %10s %22s  %s\n", "tunnel", "req/s", "ratio", "CPU/request entry, exit", "added p50", "CPU/request, 1 client", "")
	for _, r := range refs {
		fmt.Printf("%-14s %10.0f %8.2f %15.0f, %3.0f µs %7.3f ms %15.0f, %3.0f µs  %s\n", r.Tunnel, r.SmallGETs, r.Ratio, r.EntryCPU, r.ExitCPU, r.AddedP50, r.EntryCPUSerial, r.ExitCPUSerial, r.What)
	}
	var gets, p50 *Result
	for i := range results {
		switch results[i].Workload {
		case "small GETs, 64 concurrent":
			gets = &results[i]
		case "small GET latency p50, 1 client":
			p50 = &results[i]
		}
	}
	if gets != nil && p50 != nil {
		fmt.Printf("%-14s %10.0f %8.2f %22s %7.3f ms %22s  %s\n", "ferry", gets.Ferry, gets.Ratio, "(see the table)", p50.Ferry-p50.Direct, "(see the table)", "relay and agent: HTTP read and judged, credential added, logged, counted")
	}
}

// serveReference is a reference tunnel end's main: role is
// "KIND-entry" or "KIND-exit", target the address it forwards to. It
// serves until its stdin closes.
func serveReference(role, target, certFile, keyFile, caFile string) error {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return fmt.Errorf("load the certificate: %w", err)
	}
	ca, err := os.ReadFile(caFile)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca)
	end, err := newReferenceEnd(role, target, cert, roots)
	if err != nil {
		return err
	}
	defer end.close()
	done := make(chan error, 1)
	go func() { done <- end.serve() }()
	select {
	case err := <-done:
		return err
	case <-announce(end.ln.Addr().String()):
		return nil
	}
}

// referenceEnd is one end of a reference tunnel, listening on loopback.
// An entry takes plain connections, an exit TLS ones with cert; both
// reach their target over TLS, trusting roots.
type referenceEnd struct {
	ln      net.Listener
	serve   func() error // until the listener is closed
	closers []io.Closer  // what close closes before the listener
}

// close closes the end's sessions and servers, then its listener.
// Connections being forwarded end when their peers close them (close an
// entry before its exit).
func (e *referenceEnd) close() {
	for _, c := range e.closers {
		c.Close()
	}
	e.ln.Close()
}

type closerFunc func() error

func (f closerFunc) Close() error { return f() }

func newReferenceEnd(role, target string, cert tls.Certificate, roots *x509.CertPool) (*referenceEnd, error) {
	client := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	server := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	e := &referenceEnd{ln: ln}
	dial := func() (net.Conn, error) { return tls.Dial("tcp", target, client) }
	// session opens the entry's one yamux session to its exit.
	session := func() (*yamux.Session, error) {
		conn, err := dial()
		if err != nil {
			return nil, err
		}
		sess, err := yamux.Client(conn, quietYamux())
		if err != nil {
			conn.Close()
			return nil, err
		}
		e.closers = append(e.closers, sess)
		return sess, nil
	}
	switch role {
	case "pipe-entry":
		e.serve = func() error { return forwardEach(ln, dial) }
	case "pipe-exit":
		e.serve = func() error { return forwardEach(tls.NewListener(ln, server), dial) }
	case "yamux-entry":
		sess, err := session()
		if err != nil {
			ln.Close()
			return nil, err
		}
		e.serve = func() error { return forwardEach(ln, func() (net.Conn, error) { return sess.Open() }) }
	case "yamux-exit":
		sl := newSessionListener(tls.NewListener(ln, server))
		e.serve = func() error { return forwardEach(sl, dial) }
	case "proxies-entry", "proxies-exit", "proxies-yamux-entry", "proxies-yamux-exit":
		u := &url.URL{Scheme: "https", Host: target}
		tr := &http.Transport{TLSClientConfig: client, MaxIdleConnsPerHost: 256, DisableCompression: true}
		var l net.Listener = ln
		switch role {
		case "proxies-exit":
			l = tls.NewListener(ln, server)
		case "proxies-yamux-entry":
			sess, err := session()
			if err != nil {
				ln.Close()
				return nil, err
			}
			// Plain HTTP on each stream: the TLS is the session's.
			u.Scheme = "http"
			tr = &http.Transport{MaxIdleConnsPerHost: 256, DisableCompression: true,
				DialContext: func(context.Context, string, string) (net.Conn, error) { return sess.Open() }}
		case "proxies-yamux-exit":
			l = newSessionListener(tls.NewListener(ln, server))
		}
		rp := httputil.NewSingleHostReverseProxy(u)
		rp.Transport = tr
		srv := &http.Server{Handler: rp, ReadHeaderTimeout: 10 * time.Second}
		e.closers = append(e.closers, srv, closerFunc(func() error { tr.CloseIdleConnections(); return nil }))
		e.serve = func() error {
			if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		}
	default:
		ln.Close()
		return nil, fmt.Errorf("unknown reference tunnel role %q", role)
	}
	return e, nil
}

// sessionListener hands out, as connections, the yamux streams of the
// sessions clients open on its TLS listener.
type sessionListener struct {
	net.Listener
	streams chan net.Conn
	done    chan struct{} // closed when the TLS listener fails
	err     error         // why; read after done
}

func newSessionListener(l net.Listener) *sessionListener {
	sl := &sessionListener{Listener: l, streams: make(chan net.Conn), done: make(chan struct{})}
	go sl.acceptSessions()
	return sl
}

func (l *sessionListener) acceptSessions() {
	defer close(l.done)
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			l.err = err
			return
		}
		go func() {
			sess, err := yamux.Server(conn, quietYamux())
			if err != nil {
				conn.Close()
				return
			}
			defer sess.Close()
			for {
				st, err := sess.Accept()
				if err != nil {
					return
				}
				select {
				case l.streams <- st:
				case <-l.done:
					st.Close()
					return
				}
			}
		}()
	}
}

func (l *sessionListener) Accept() (net.Conn, error) {
	select {
	case st := <-l.streams:
		return st, nil
	case <-l.done:
		return nil, l.err
	}
}

func quietYamux() *yamux.Config {
	c := yamux.DefaultConfig()
	c.LogOutput = io.Discard
	return c
}

// forwardEach copies each accepted connection to and from a connection of
// dial's, until either side ends.
func forwardEach(ln net.Listener, dial func() (net.Conn, error)) error {
	for {
		in, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return err
		}
		go func() {
			defer in.Close()
			out, err := dial()
			if err != nil {
				fmt.Fprintln(os.Stderr, "bench reference: dial:", err)
				return
			}
			defer out.Close()
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				io.Copy(out, in)
				out.Close()
			}()
			io.Copy(in, out)
			in.Close()
			wg.Wait()
		}()
	}
}
