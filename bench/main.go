// Command bench measures ferry side by side with a direct connection, on
// loopback, in one run: the same workloads go straight to the upstream and
// through relay and agent (real binaries, TLS on as in production). It
// prints a table and writes bench/results.json. `make bench` runs it.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/internal/token"
)

// Result is one line of the table.
type Result struct {
	Workload string  `json:"workload"`
	Unit     string  `json:"unit"`
	Direct   float64 `json:"direct,omitempty"`
	Ferry    float64 `json:"ferry"`
	Ratio    float64 `json:"ratio,omitempty"` // ferry ÷ direct
	Target   string  `json:"target"`
	Met      bool    `json:"met"`
	Note     string  `json:"note,omitempty"`
}

type setup struct {
	dir                 string
	pki                 *testrig.PKI
	upstream            string // https://127.0.0.1:port
	upstreamProc        *child
	pat                 string
	scannerTok          string
	agentTok            string
	relayCfg, agentCfg  string
	relayBin, agentBin  string
	relay, agent        *exec.Cmd
	agentAddr, scanAddr string
	adminAddr           string
	diagAddr            string // the agent's diagnostics listener
	direct, viaFerry    *http.Client
	keepProfiles        bool     // -pprof: workloads that take profiles write them out
	env                 []string // added to the relay's and agent's environment
	rounds              int      // runs of each throughput workload, alternating
}

// relayGauge reads one unlabelled gauge from the relay's /metrics.
func (s *setup) relayGauge(name string) float64 { return metric(s.adminAddr, name) }

// metric reads one unlabelled metric from the /metrics at addr; 0 if it
// cannot.
func metric(addr, name string) float64 {
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

// envFlag collects -env NAME=value flags.
type envFlag []string

func (e *envFlag) String() string { return strings.Join(*e, " ") }

func (e *envFlag) Set(v string) error {
	if name, _, ok := strings.Cut(v, "="); !ok || name == "" {
		return fmt.Errorf("want NAME=value, got %q", v)
	}
	*e = append(*e, v)
	return nil
}

func main() {
	if len(os.Args) == 7 && os.Args[1] == referenceFlag {
		if err := serveReference(os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]); err != nil {
			fmt.Fprintln(os.Stderr, "bench reference tunnel:", err)
			os.Exit(1)
		}
		return
	}
	if len(os.Args) == 5 && os.Args[1] == upstreamFlag {
		if err := serveUpstream(os.Args[2], os.Args[3], os.Args[4]); err != nil {
			fmt.Fprintln(os.Stderr, "bench upstream:", err)
			os.Exit(1)
		}
		return
	}
	bin := flag.String("bin", "bin", "directory with ferry-relay and ferry-agent")
	out := flag.String("out", "bench/results.json", "where to write the results")
	size := flag.Int64("size", 1<<30, "bytes for the download and upload workloads")
	agents := flag.Int("agents", 5000, "idle agent connections for the relay memory figure")
	clones := flag.Int("clones", 32, "parallel git clones")
	repoMiB := flag.Int("repo-mib", 50, "size of the cloned repository, MiB")
	pprof := flag.Bool("pprof", false, "enable the profiler on the relay's and agent's admin listeners and print their addresses")
	rounds := flag.Int("rounds", 3, "alternating direct/ferry runs of each throughput workload; the median is reported")
	var env envFlag
	flag.Var(&env, "env", "NAME=value added to the relay's and agent's environment, e.g. GOMAXPROCS=1 (repeatable): to try runtime settings on this machine")
	only := flag.String("only", "", "comma-separated workloads to run (download,upload,gets,latency,references,clones,rss,relay-memory,restart,soak); default all but soak")
	soak := flag.Duration("soak", 5*time.Minute, "traffic time of the soak workload (which adds about 4 minutes of warm-up and quiet)")
	flag.Parse()
	named := func(name string) bool { return slices.Contains(strings.Split(*only, ","), name) }
	want := func(name string) bool { return *only == "" || named(name) }
	raiseFileLimit()
	// The soak reads the live heap through the daemons' profilers.
	s, err := start(*bin, *pprof || named("soak"), env)
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	s.keepProfiles = *pprof
	s.rounds = max(1, *rounds)
	defer s.stop()
	var results []Result
	add := func(r Result, err error) {
		if err != nil {
			fmt.Fprintf(os.Stderr, "bench: %s: %v\n", r.Workload, err)
			r.Note = "error: " + err.Error()
		}
		results = append(results, r)
		fmt.Fprintf(os.Stderr, "  done: %s\n", r.Workload)
	}
	fmt.Fprintf(os.Stderr, "bench: relay and agent up; running workloads\n")
	if want("download") {
		add(s.download(*size))
	}
	if want("upload") {
		add(s.upload(*size))
	}
	if want("gets") {
		add(s.smallGETs(64, 5*time.Second))
	}
	if want("latency") {
		lat50, lat99, err := s.latency(2000)
		add(lat50, err)
		add(lat99, err)
	}
	var refs []Reference
	if want("references") {
		var err error
		if refs, err = s.references(64, 5*time.Second, 2000); err != nil {
			fmt.Fprintln(os.Stderr, "bench: reference tunnels:", err)
		}
		fmt.Fprintf(os.Stderr, "  done: reference tunnels\n")
	}
	if want("clones") {
		add(s.cloneBench(*clones, *repoMiB))
	}
	if want("rss") {
		add(s.agentPeakRSS())
	}
	// Not in the default run, which must stay under 10 minutes.
	if named("soak") {
		rs, err := s.soak(*soak)
		for _, r := range rs {
			add(r, err)
		}
	}
	// The restart comes first, so the memory figure is that of a fresh
	// relay, not one whose heap earlier workloads grew (and it reuses).
	if want("restart") {
		add(s.restartToFirstRequest())
	}
	if want("relay-memory") {
		add(s.relayMemoryPerAgent(*agents, *rounds))
	}
	printTable(results)
	printReferences(refs, results)
	if *only != "" {
		fmt.Println("\n(partial run: bench/results.json not written)")
		return
	}
	if err := writeJSON(*out, results, refs, env); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
	fmt.Printf("\nwritten to %s\n", *out)
}

func raiseFileLimit() {
	var l syscall.Rlimit
	if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil && l.Cur < l.Max {
		l.Cur = l.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &l)
	}
}

// blob is 1 MiB of random bytes served (and sent) repeatedly: the
// workloads measure the tunnel, not a data generator.
var blob = func() []byte { b := make([]byte, 1<<20); rand.Read(b); return b }()

type repeatReader struct{ left int64 }

func (r *repeatReader) Read(p []byte) (int, error) {
	if r.left <= 0 {
		return 0, io.EOF
	}
	n := copy(p, blob[:min(int64(len(blob)), r.left)])
	r.left -= int64(n)
	return n, nil
}

func start(bin string, pprof bool, env []string) (_ *setup, err error) {
	s := &setup{relayBin: filepath.Join(bin, "ferry-relay"), agentBin: filepath.Join(bin, "ferry-agent"), env: env}
	defer func() {
		if err != nil { // no daemon outlives a failed start
			s.stop()
		}
	}()
	for _, b := range []string{s.relayBin, s.agentBin} {
		if _, err := os.Stat(b); err != nil {
			return nil, fmt.Errorf("%s missing: run make build", b)
		}
	}
	if s.dir, err = os.MkdirTemp("", "ferry-bench-"); err != nil {
		return nil, err
	}
	if s.pki, err = testrig.NewPKI(s.dir); err != nil {
		return nil, err
	}
	s.pat = benchPAT
	if err := s.startUpstream(); err != nil {
		return nil, err
	}

	s.agentTok, _ = token.Generate()
	s.scannerTok, _ = token.Generate()
	write := func(name, body string) string {
		p := filepath.Join(s.dir, name)
		os.WriteFile(p, []byte(body), 0o600)
		return p
	}
	write("relay-token", s.agentTok)
	write("pat", s.pat)
	// Fixed addresses below the ephemeral range: a restarted relay comes
	// back where its agent and clients look, as after a deploy, and no
	// outgoing connection can take its port while it is down.
	agentAddr, err := testrig.StableAddr()
	if err != nil {
		return nil, err
	}
	scanAddr, err := testrig.StableAddr()
	if err != nil {
		return nil, err
	}
	s.relayCfg = write("relay.yaml", fmt.Sprintf(`agent_listen: %q
tls: {cert_file: %s, key_file: %s}
scanner_listen: %q
admin_listen: "127.0.0.1:0"
tunnels: [{id: bench, agent_tokens: [%q]}]
scanners: [{name: bench, token: %q, tunnels: [bench]}]
limits: {max_streams_per_tunnel: 100000, max_agent_connections_per_tunnel: 100000}
admin_pprof: %t
`, agentAddr, s.pki.CertFile, s.pki.KeyFile, scanAddr, token.Of(s.agentTok).String(), token.Of(s.scannerTok).String(), pprof))
	if err := s.startRelay(s.relayCfg); err != nil {
		return nil, err
	}
	diag, err := testrig.StableAddr()
	if err != nil {
		return nil, err
	}
	s.diagAddr = diag
	if pprof {
		fmt.Fprintf(os.Stderr, "bench: profiles at http://%s/debug/pprof/ (relay) and http://%s/debug/pprof/ (agent)\n", s.adminAddr, diag)
	}
	s.agentCfg = write("agent.yaml", fmt.Sprintf(`relay: {url: "wss://%s/v1/connect", token_file: %s, ca_file: %s, connections: 2}
upstreams:
  - name: bitbucket
    url: %s
    ca_file: %s
    auth: {type: bearer, token_file: %s}
    profile: bitbucket-dc-read
    rules: [{methods: [GET, POST], path: "/bench/**"}]
diagnostics: {listen: %q, pprof: %t}
`, s.agentAddr, filepath.Join(s.dir, "relay-token"), s.pki.CAFile, s.upstream, s.pki.CAFile, filepath.Join(s.dir, "pat"), diag, pprof))
	// Logs at the default level (info, a line per request: part of the
	// cost being measured) go to files, not the terminal.
	agentLog, err := os.Create(filepath.Join(s.dir, "agent.log"))
	if err != nil {
		return nil, err
	}
	s.agent = exec.Command(s.agentBin, "--config", s.agentCfg)
	s.agent.Env = append(os.Environ(), s.env...)
	s.agent.Stderr = agentLog
	if err := s.agent.Start(); err != nil {
		return nil, err
	}
	tr := func() *http.Transport {
		return &http.Transport{TLSClientConfig: s.pki.ClientTLS(), MaxIdleConnsPerHost: 256, DisableCompression: true,
			WriteBufferSize: 256 << 10, ReadBufferSize: 256 << 10}
	}
	s.direct = &http.Client{Transport: tr()}
	s.viaFerry = &http.Client{Transport: tr()}
	if err := s.waitThrough(15 * time.Second); err != nil {
		return nil, err
	}
	return s, nil
}

// saveProfile writes one of the relay's pprof profiles to the working
// directory.
func (s *setup) saveProfile(name, file string) error {
	resp, err := http.Get("http://" + s.adminAddr + "/debug/pprof/" + name)
	if err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	defer resp.Body.Close()
	f, err := os.Create(file)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := io.Copy(f, resp.Body); err != nil {
		return fmt.Errorf("profile %s: %w", name, err)
	}
	fmt.Fprintf(os.Stderr, "bench: relay %s profile written to %s\n", name, file)
	return nil
}

// startRelay runs the relay and learns its addresses from its log.
func (s *setup) startRelay(cfg string) error {
	s.relay = exec.Command(s.relayBin, "--config", cfg)
	s.relay.Env = append(os.Environ(), s.env...)
	pipe, err := s.relay.StderrPipe()
	if err != nil {
		return err
	}
	if err := s.relay.Start(); err != nil {
		return err
	}
	sc := bufio.NewScanner(pipe)
	for sc.Scan() {
		var m map[string]any
		if json.Unmarshal(sc.Bytes(), &m) == nil && m["msg"] == "relay started" {
			s.agentAddr, s.scanAddr, s.adminAddr = m["agent_listen"].(string), m["scanner_listen"].(string), m["admin_listen"].(string)
			f, err := os.OpenFile(filepath.Join(s.dir, "relay.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
			if err != nil {
				return err
			}
			go func() { io.Copy(f, pipe); f.Close() }()
			return nil
		}
		fmt.Fprintln(os.Stderr, sc.Text())
	}
	return fmt.Errorf("relay exited before it started")
}

func (s *setup) stop() {
	for _, c := range []*exec.Cmd{s.agent, s.relay} {
		if c != nil && c.Process != nil {
			c.Process.Signal(syscall.SIGTERM)
			c.Wait()
		}
	}
	s.upstreamProc.stop()
	os.RemoveAll(s.dir)
}

func (s *setup) waitThrough(limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if resp, err := s.do(s.viaFerry, "GET", s.ferryURL("/bench/small"), nil, -1); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	return fmt.Errorf("no request got through ferry in %v", limit)
}

func (s *setup) ferryURL(p string) string  { return "http://" + s.scanAddr + "/t/bench/bitbucket" + p }
func (s *setup) directURL(p string) string { return s.upstream + p }

func (s *setup) do(c *http.Client, method, url string, body io.Reader, length int64) (*http.Response, error) {
	req, err := http.NewRequest(method, url, body)
	if err != nil {
		return nil, err
	}
	if length >= 0 {
		req.ContentLength = length
	}
	tok := s.pat
	if c == s.viaFerry {
		tok = s.scannerTok
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	return c.Do(req)
}

// both runs a measurement direct and through ferry, alternately, rounds
// times, and returns the median of each: on a shared machine one run of
// either can be off by a third.
func (s *setup) both(f func(c *http.Client, url func(string) string) (float64, error)) (float64, float64, error) {
	var ds, fs []float64
	for i := 0; i < s.rounds; i++ {
		d, err := f(s.direct, s.directURL)
		if err != nil {
			return 0, 0, fmt.Errorf("direct: %w", err)
		}
		v, err := f(s.viaFerry, s.ferryURL)
		if err != nil {
			return median(ds), 0, fmt.Errorf("ferry: %w", err)
		}
		ds, fs = append(ds, d), append(fs, v)
	}
	return median(ds), median(fs), nil
}

// median is the middle of xs, which it sorts in place.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	slices.Sort(xs)
	return xs[len(xs)/2]
}

func ratio(name, unit string, d, f, target float64) Result {
	r := Result{Workload: name, Unit: unit, Direct: d, Ferry: f, Target: fmt.Sprintf("ratio ≥ %.2f", target)}
	if d > 0 {
		r.Ratio = f / d
	}
	r.Met = r.Ratio >= target
	return r
}

// costMeter adds up the relay's and agent's CPU time, and the bytes their
// heaps allocated, over the runs through ferry: figures of ferry's own
// cost that the machine's noise, which moves the rates by a third, hardly
// moves. It also adds up the bench process's own CPU (the client and the
// upstream) over the runs both ways, for bulk workloads: with every
// process on the same cores, what the tunnel can reach at best is what
// direct costs over what all of them cost through ferry.
type costMeter struct {
	s                      *setup
	relay, agent           time.Duration
	relayAlloc, agentAlloc float64
	runs                   int
	selfDirect, selfFerry  time.Duration
	runsDirect             int
}

// measure starts measuring a run with client c; the returned func ends
// it.
func (m *costMeter) measure(c *http.Client) (end func()) {
	self0 := m.s.clientAndUpstreamCPU()
	if c != m.s.viaFerry {
		return func() {
			m.selfDirect += m.s.clientAndUpstreamCPU() - self0
			m.runsDirect++
		}
	}
	const allocated = "go_memstats_alloc_bytes_total"
	relay0, agent0 := m.s.daemonCPU()
	ra0, aa0 := metric(m.s.adminAddr, allocated), metric(m.s.diagAddr, allocated)
	return func() {
		m.selfFerry += m.s.clientAndUpstreamCPU() - self0
		relay1, agent1 := m.s.daemonCPU()
		m.relay, m.agent, m.runs = m.relay+relay1-relay0, m.agent+agent1-agent0, m.runs+1
		m.relayAlloc += metric(m.s.adminAddr, allocated) - ra0
		m.agentAlloc += metric(m.s.diagAddr, allocated) - aa0
	}
}

// perRequest is the note for n requests through ferry.
func (m *costMeter) perRequest(n int64) string {
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("per request: CPU relay %d µs, agent %d µs; heap allocated relay %.1f KB, agent %.1f KB",
		m.relay.Microseconds()/n, m.agent.Microseconds()/n, m.relayAlloc/float64(n)/1e3, m.agentAlloc/float64(n)/1e3)
}

// perGiB is the note for a bulk workload of size bytes a run whose
// direct median was direct MB/s. Its ceiling is the rate through ferry if
// all of the machine's CPUs did nothing but this workload's work.
func (m *costMeter) perGiB(size int64, direct float64) string {
	if m.runs == 0 || m.runsDirect == 0 || size == 0 {
		return ""
	}
	gib := float64(size) / (1 << 30)
	relay, agent := m.relay.Seconds()/gib/float64(m.runs), m.agent.Seconds()/gib/float64(m.runs)
	selfD, selfF := m.selfDirect.Seconds()/gib/float64(m.runsDirect), m.selfFerry.Seconds()/gib/float64(m.runs)
	ceiling := float64(runtime.NumCPU()) / (selfF + relay + agent) * (1 << 30) / 1e6
	note := fmt.Sprintf("CPU per GiB: relay %.2f s, agent %.2f s; client and upstream %.2f s direct, %.2f s through ferry", relay, agent, selfD, selfF)
	if direct > 0 {
		note += fmt.Sprintf("; CPU-bound on %d CPUs, ferry could reach at most %.0f MB/s (ratio %.2f)", runtime.NumCPU(), ceiling, ceiling/direct)
	}
	return note
}

func (s *setup) download(size int64) (Result, error) {
	cost := &costMeter{s: s}
	d, f, err := s.both(func(c *http.Client, url func(string) string) (float64, error) {
		defer cost.measure(c)()
		start := time.Now()
		resp, err := s.do(c, "GET", url("/bench/blob?size="+strconv.FormatInt(size, 10)), nil, -1)
		if err != nil {
			return 0, err
		}
		defer resp.Body.Close()
		n, err := io.CopyBuffer(io.Discard, resp.Body, make([]byte, 256<<10))
		if err != nil || n != size {
			return 0, fmt.Errorf("read %d of %d: %v", n, size, err)
		}
		return float64(n) / 1e6 / time.Since(start).Seconds(), nil
	})
	r := ratio(fmt.Sprintf("download %d MiB", size>>20), "MB/s", d, f, 0.40)
	r.Note = cost.perGiB(size, d)
	return r, err
}

func (s *setup) upload(size int64) (Result, error) {
	cost := &costMeter{s: s}
	d, f, err := s.both(func(c *http.Client, url func(string) string) (float64, error) {
		defer cost.measure(c)()
		start := time.Now()
		resp, err := s.do(c, "POST", url("/bench/sink"), &repeatReader{left: size}, size)
		if err != nil {
			return 0, err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if strings.TrimSpace(string(b)) != strconv.FormatInt(size, 10) {
			return 0, fmt.Errorf("sink got %q of %d (status %d)", b, size, resp.StatusCode)
		}
		return float64(size) / 1e6 / time.Since(start).Seconds(), nil
	})
	r := ratio(fmt.Sprintf("upload %d MiB", size>>20), "MB/s", d, f, 0.35)
	r.Note = cost.perGiB(size, d)
	return r, err
}

func (s *setup) smallGETs(workers int, dur time.Duration) (Result, error) {
	cost := &costMeter{s: s}
	var served int64 // through ferry
	d, f, err := s.both(func(c *http.Client, url func(string) string) (float64, error) {
		defer cost.measure(c)()
		rate, n, err := s.load(c, url("/bench/small"), workers, dur)
		if c == s.viaFerry {
			served += n
		}
		return rate, err
	})
	r := ratio(fmt.Sprintf("small GETs, %d concurrent", workers), "req/s", d, f, 0.35)
	r.Note = cost.perRequest(served)
	return r, err
}

// load runs workers clients, each sending small GETs to url one after
// another for dur: the rate of answers a second, and the requests sent.
// Any request that fails or is not a 200 fails the run.
func (s *setup) load(c *http.Client, url string, workers int, dur time.Duration) (float64, int64, error) {
	var n, bad atomic.Int64
	stop := time.Now().Add(dur)
	var wg sync.WaitGroup
	for i := 0; i < workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				resp, err := s.do(c, "GET", url, nil, -1)
				if err != nil {
					bad.Add(1)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode == 200 {
					n.Add(1)
				} else {
					bad.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	sent := n.Load() + bad.Load()
	if bad.Load() > 0 {
		return 0, sent, fmt.Errorf("%d requests failed", bad.Load())
	}
	return float64(n.Load()) / dur.Seconds(), sent, nil
}

// warmUp is how many requests sequential sends before it times any.
const warmUp = 50

// sequential times n GETs of url, one at a time, after the warm-up; each
// must answer want. The times come sorted.
func (s *setup) sequential(c *http.Client, url string, n, want int) ([]time.Duration, error) {
	out := make([]time.Duration, 0, n)
	for i := 0; i < n+warmUp; i++ {
		start := time.Now()
		resp, err := s.do(c, "GET", url, nil, -1)
		if err != nil {
			return nil, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != want {
			return nil, fmt.Errorf("GET %s: status %d, want %d", url, resp.StatusCode, want)
		}
		if i >= warmUp {
			out = append(out, time.Since(start))
		}
	}
	slices.Sort(out)
	return out, nil
}

// latency measures n sequential small GETs direct and through ferry. The
// notes break the added time down by measuring two shorter paths through
// ferry the same way: a request the relay answers itself (a tunnel that
// does not exist: 404) and one the agent refuses (a path its rules do not
// allow: 403), which crosses the tunnel and back but not to the upstream.
// They also give the CPU the relay and agent spend, and the heap bytes
// they allocate, per request at this load (one request at a time), to set
// beside the figures under load.
func (s *setup) latency(n int) (Result, Result, error) {
	fail := func(err error) (Result, Result, error) {
		return Result{Workload: "latency p50"}, Result{Workload: "latency p99"}, err
	}
	d, err := s.sequential(s.direct, s.directURL("/bench/small"), n, http.StatusOK)
	if err != nil {
		return fail(fmt.Errorf("direct: %w", err))
	}
	relayOnly, err := s.sequential(s.viaFerry, "http://"+s.scanAddr+"/t/no-such-tunnel/bitbucket/bench/small", n, http.StatusNotFound)
	if err != nil {
		return fail(fmt.Errorf("relay only: %w", err))
	}
	refused, err := s.sequential(s.viaFerry, s.ferryURL("/not-allowed"), n, http.StatusForbidden)
	if err != nil {
		return fail(fmt.Errorf("refused by the agent: %w", err))
	}
	cost := &costMeter{s: s}
	end := cost.measure(s.viaFerry)
	f, err := s.sequential(s.viaFerry, s.ferryURL("/bench/small"), n, http.StatusOK)
	end()
	if err != nil {
		return fail(fmt.Errorf("ferry: %w", err))
	}
	perRequest := cost.perRequest(int64(n + warmUp))
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	p := func(xs []time.Duration, q float64) time.Duration { return xs[int(q*float64(len(xs)-1))] }
	mk := func(name string, q, target float64) Result {
		dd, ff := ms(p(d, q)), ms(p(f, q))
		return Result{Workload: name, Unit: "ms", Direct: dd, Ferry: ff, Ratio: 0,
			Target: fmt.Sprintf("added ≤ %.1f ms", target), Met: ff-dd <= target,
			Note: fmt.Sprintf("added %.3f ms; through ferry: relay answering itself %.3f ms, agent refusing %.3f ms; %s",
				ff-dd, ms(p(relayOnly, q)), ms(p(refused, q)), perRequest)}
	}
	return mk("small GET latency p50, 1 client", 0.50, 0.3), mk("small GET latency p99, 1 client", 0.99, 2), nil
}

// daemonCPU is the CPU time (user and system) the relay and agent
// processes have used so far.
func (s *setup) daemonCPU() (relay, agent time.Duration) {
	return procCPU(s.relay.Process.Pid), procCPU(s.agent.Process.Pid)
}

// clientAndUpstreamCPU is the CPU time the bench process (the client) and
// the upstream have used so far.
func (s *setup) clientAndUpstreamCPU() time.Duration {
	return procCPU(os.Getpid()) + procCPU(s.upstreamProc.pid())
}

// procCPU reads a process's utime and stime from /proc, in clock ticks of
// USER_HZ, which is 100 on Linux.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name, field 2, may hold spaces: count from after it.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(utime+stime) * (time.Second / 100)
}

func (s *setup) cloneBench(n, mib int) (Result, error) {
	name := fmt.Sprintf("%d parallel git clones, %d MiB repo", n, mib)
	if err := makeRepo(s.gitRoot(), "big/repo.git", mib); err != nil {
		return Result{Workload: name}, err
	}
	run := func(url, tok string, extra ...string) (float64, error) {
		start := time.Now()
		errs := make(chan error, n)
		for i := 0; i < n; i++ {
			go func() {
				dst := filepath.Join(s.dir, fmt.Sprintf("clone-%d-%d", time.Now().UnixNano(), i))
				defer os.RemoveAll(dst)
				args := append(append([]string(nil), extra...), "-c", "http.extraHeader=Authorization: Bearer "+tok, "clone", "-q", url, dst)
				cmd := exec.Command("git", args...)
				// GIT_SSL_CAINFO, if the machine sets it, would override -c.
				cmd.Env = append(testrig.GitEnv(), "GIT_SSL_CAINFO="+s.pki.CAFile)
				out, err := cmd.CombinedOutput()
				if err != nil {
					err = fmt.Errorf("git clone: %v: %s", err, out)
				}
				errs <- err
			}()
		}
		for i := 0; i < n; i++ {
			if err := <-errs; err != nil {
				return 0, err
			}
		}
		return float64(n) / time.Since(start).Seconds(), nil
	}
	d, err := run(s.directURL("/scm/big/repo.git"), s.pat)
	if err != nil {
		return Result{Workload: name}, fmt.Errorf("direct: %w", err)
	}
	f, err := run(s.ferryURL("/scm/big/repo.git"), s.scannerTok)
	if err != nil {
		return Result{Workload: name}, fmt.Errorf("ferry: %w", err)
	}
	return ratio(name, "clones/s", d, f, 0.70), nil
}

// makeRepo creates the bare repository name under root with mib MiB of
// incompressible files.
func makeRepo(root, name string, mib int) error {
	work, err := os.MkdirTemp("", "ferry-bench-repo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	if _, err := testrig.Git(work, "init", "-q", "-b", "main"); err != nil {
		return err
	}
	for i := 0; i < mib; i++ {
		b := make([]byte, 1<<20)
		rand.Read(b)
		if err := os.WriteFile(filepath.Join(work, fmt.Sprintf("asset-%03d.bin", i)), b, 0o644); err != nil {
			return err
		}
	}
	for _, args := range [][]string{{"add", "-A"}, {"commit", "-q", "-m", "assets"}} {
		if _, err := testrig.Git(work, args...); err != nil {
			return err
		}
	}
	bare := filepath.Join(root, name)
	os.MkdirAll(filepath.Dir(bare), 0o755)
	_, err = testrig.Git(work, "clone", "-q", "--bare", work, bare)
	return err
}

func procStatus(pid int, field string) (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, field+":") {
			f := strings.Fields(l)
			kb, err := strconv.ParseFloat(f[1], 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

func (s *setup) agentPeakRSS() (Result, error) {
	hwm, err := procStatus(s.agent.Process.Pid, "VmHWM")
	r := Result{Workload: "agent peak RSS (download, upload, clones)", Unit: "MiB", Ferry: hwm / (1 << 20), Target: "≤ 64 MiB"}
	r.Met = err == nil && r.Ferry <= 64
	// The relay has no target of its own here; its figure is for
	// sizing its container (it restarts for the restart workload, after
	// this one).
	if relay, rerr := procStatus(s.relay.Process.Pid, "VmHWM"); rerr == nil {
		r.Note = fmt.Sprintf("relay peak RSS %.1f MiB", relay/(1<<20))
	}
	return r, err
}

// relayMemoryPerAgent connects n lightweight in-process agents (the real
// protocol: TLS, WebSocket, yamux, hello) to a fresh relay and reads how
// much its RSS grew, rounds times (a fresh relay each), reporting the
// median: where the relay's last GC fell in the connection storm moves
// one reading by a few KiB per agent.
func (s *setup) relayMemoryPerAgent(n, rounds int) (Result, error) {
	r := Result{Workload: fmt.Sprintf("relay memory per idle agent connection, %d connected", n), Unit: "KiB", Target: "≤ 48 KiB"}
	var perAgent []float64
	var notes []string
	for i := range rounds {
		if i > 0 {
			if err := s.restartRelay(); err != nil {
				return r, err
			}
		}
		kib, note, err := s.idleAgentsOnce(n)
		if err != nil {
			return r, err
		}
		perAgent = append(perAgent, kib)
		notes = append(notes, note)
	}
	readings := make([]string, len(perAgent))
	for i, v := range perAgent {
		readings[i] = fmt.Sprintf("%.1f", v)
	}
	mid := median(slices.Clone(perAgent))
	for i, v := range perAgent {
		if v == mid {
			r.Note = fmt.Sprintf("rounds: %s KiB; median round: %s", strings.Join(readings, ", "), notes[i])
		}
	}
	r.Ferry = mid
	r.Met = r.Ferry <= 48
	return r, nil
}

// idleAgentsOnce connects n idle agents to the running relay, returns its
// RSS growth per agent and what it was made of, and disconnects them.
func (s *setup) idleAgentsOnce(n int) (float64, string, error) {
	time.Sleep(time.Second)
	before, err := procStatus(s.relay.Process.Pid, "VmRSS")
	if err != nil {
		return 0, "", err
	}
	g0, h0, st0 := s.relayGauge("go_goroutines"), s.relayGauge("go_memstats_heap_inuse_bytes"), s.relayGauge("go_memstats_stack_inuse_bytes")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	conns, err := connectIdleAgents(ctx, s, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	if err != nil {
		return 0, "", err
	}
	time.Sleep(2 * time.Second)
	after, err := procStatus(s.relay.Process.Pid, "VmRSS")
	if err != nil {
		return 0, "", err
	}
	if s.keepProfiles {
		if err := s.saveProfile("heap", "relay-idle-agents-heap.pprof"); err != nil {
			return 0, "", err
		}
	}
	nf := float64(n)
	note := fmt.Sprintf("relay RSS %.0f → %.0f MiB; per connection: %.1f goroutines, heap %.1f KiB, stacks %.1f KiB", before/(1<<20), after/(1<<20),
		(s.relayGauge("go_goroutines")-g0)/nf, (s.relayGauge("go_memstats_heap_inuse_bytes")-h0)/nf/1024, (s.relayGauge("go_memstats_stack_inuse_bytes")-st0)/nf/1024)
	return (after - before) / nf / 1024, note, nil
}

func (s *setup) restartToFirstRequest() (Result, error) {
	r := Result{Workload: "relay restart to first successful request", Unit: "s", Target: "≤ 1.5 s"}
	s.stopRelay()
	start := time.Now()
	if err := s.startRelay(s.relayCfg); err != nil {
		return r, err
	}
	s.viaFerry.CloseIdleConnections()
	if err := s.waitThrough(30 * time.Second); err != nil {
		return r, err
	}
	r.Ferry = time.Since(start).Seconds()
	r.Met = r.Ferry <= 1.5
	return r, nil
}

func (s *setup) stopRelay() {
	s.relay.Process.Signal(syscall.SIGTERM)
	s.relay.Wait()
}

// restartRelay gives the next workload a fresh relay process.
func (s *setup) restartRelay() error {
	s.stopRelay()
	return s.startRelay(s.relayCfg)
}

func printTable(rs []Result) {
	if idle := cpuIdle(); idle != "" {
		fmt.Printf("\nidle CPUs: %s\n", idle)
	}
	fmt.Printf("\n%-58s %12s %12s %8s %-18s %s\n", "workload", "direct", "ferry", "ratio", "target", "")
	for _, r := range rs {
		d, ratio := "", ""
		if r.Direct != 0 {
			d = fmt.Sprintf("%.2f", r.Direct)
		}
		if r.Ratio != 0 {
			ratio = fmt.Sprintf("%.2f", r.Ratio)
		}
		mark := "✓"
		if !r.Met {
			mark = "✗"
		}
		fmt.Printf("%-58s %12s %12s %8s %-18s %s %s\n", r.Workload+" ("+r.Unit+")", d, fmt.Sprintf("%.2f", r.Ferry), ratio, r.Target, mark, r.Note)
	}
}

// cpuIdle says how this machine's idle CPUs wait for work. In a VM whose
// guest halts an idle vCPU at once (the haltpoll driver with no polling),
// a wake-up that lands on a halted vCPU waits for it to come back (15–25
// µs where it was measured), and a request through ferry wakes a process
// six times to direct's two: it shows in the latency rows (README,
// Performance). Empty where Linux does not say.
func cpuIdle() string {
	read := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			return ""
		}
		return strings.TrimSpace(string(b))
	}
	driver := read("/sys/devices/system/cpu/cpuidle/current_driver")
	if driver == "" {
		return ""
	}
	s := "driver " + driver
	if g := read("/sys/devices/system/cpu/cpuidle/current_governor"); g != "" {
		s += ", governor " + g
	}
	if ns := read("/sys/module/haltpoll/parameters/guest_halt_poll_ns"); ns != "" {
		s += ", guest_halt_poll_ns " + ns
	}
	return s
}

func writeJSON(path string, rs []Result, refs []Reference, env []string) error {
	commit, _ := exec.Command("git", "rev-parse", "HEAD").Output()
	cpu := ""
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "model name") {
				cpu = strings.TrimSpace(strings.SplitN(l, ":", 2)[1])
				break
			}
		}
	}
	doc := map[string]any{
		"time":    time.Now().UTC().Format(time.RFC3339),
		"commit":  strings.TrimSpace(string(commit)),
		"machine": map[string]any{"cpus": runtime.NumCPU(), "cpu": cpu, "go": runtime.Version(), "os": runtime.GOOS + "/" + runtime.GOARCH, "cpuidle": cpuIdle()},
		"results": rs,
	}
	if len(refs) > 0 {
		doc["references"] = refs // not ferry: the scale of this machine
	}
	if len(env) > 0 {
		doc["daemon_env"] = env // figures of a tuned run, not the defaults
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	os.MkdirAll(filepath.Dir(path), 0o755)
	return os.WriteFile(path, append(b, '\n'), 0o644)
}
