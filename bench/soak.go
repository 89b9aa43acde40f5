package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing/iotest"
	"time"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// soakQuiet is how long the soak leaves ferry alone before each reading:
// longer than everything idle is kept (the agent's idle upstream
// connections, 90 s; the relay's kept streams, 30 s), so that a reading
// holds only what a quiet daemon holds.
const soakQuiet = 95 * time.Second

// daemonDumps are a daemon's heap profile and goroutine stacks at a
// reading.
type daemonDumps struct{ heap, goroutines []byte }

// daemonState is what the soak reads of one daemon.
type daemonState struct {
	goroutines float64
	files      int
	liveHeap   float64 // bytes, right after a collection
	rss        float64
	// From the daemon's own metrics: requests it counts in flight (0 when
	// quiet, or a count leaks) and relay connections up (the agent's 2,
	// also after its connections were cut).
	inFlight, tunnelConns float64
}

func (d daemonState) String() string {
	return fmt.Sprintf("%.0f goroutines, %d open files, live heap %.1f MiB, RSS %.1f MiB, %.0f requests in flight, %.0f tunnel connections",
		d.goroutines, d.files, d.liveHeap/(1<<20), d.rss/(1<<20), d.inFlight, d.tunnelConns)
}

// readDaemon reads a daemon's state; metricsAddr serves its /metrics and
// /debug/pprof (the soak starts the daemons with their profilers on). It
// also returns the daemon's heap profile and goroutine stacks, taken at
// the same moment.
func readDaemon(pid int, metricsAddr, inFlightMetric, connsMetric string) (daemonState, daemonDumps, error) {
	var st daemonState
	// A heap profile with gc=1 collects first. Twice: what sync.Pools
	// hold survives one collection (as their victims) and would read as
	// live heap.
	var profile []byte
	for range 2 {
		resp, err := http.Get("http://" + metricsAddr + "/debug/pprof/heap?gc=1")
		if err != nil {
			return st, daemonDumps{}, fmt.Errorf("collect garbage: %w", err)
		}
		profile, err = io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || resp.StatusCode != http.StatusOK {
			return st, daemonDumps{}, fmt.Errorf("collect garbage: %s %v (is the profiler on?)", resp.Status, err)
		}
	}
	st.liveHeap = metric(metricsAddr, "go_memstats_heap_alloc_bytes")
	st.inFlight, st.tunnelConns = metric(metricsAddr, inFlightMetric), metric(metricsAddr, connsMetric)
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return st, daemonDumps{}, fmt.Errorf("count open files: %w", err)
	}
	st.files = len(fds)
	if st.rss, err = procStatus(pid, "VmRSS"); err != nil {
		return st, daemonDumps{}, err
	}
	// Goroutines come and go while nothing happens (a keepalive, a
	// worker that reads a control message and ends): the fewest of a few
	// counts is what the daemon holds. A leaked one stays in every count.
	var stacks []byte
	for i := range 5 {
		if i > 0 {
			time.Sleep(time.Second)
		}
		n, dump, err := goroutines(metricsAddr)
		if err != nil {
			return st, daemonDumps{}, err
		}
		if i == 0 || n < st.goroutines {
			st.goroutines, stacks = n, dump
		}
	}
	return st, daemonDumps{heap: profile, goroutines: stacks}, nil
}

// goroutines reads a daemon's goroutine stacks and how many there are.
func goroutines(addr string) (float64, []byte, error) {
	resp, err := http.Get("http://" + addr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, nil, fmt.Errorf("goroutine dump: %w", err)
	}
	defer resp.Body.Close()
	dump, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, nil, fmt.Errorf("goroutine dump: %w", err)
	}
	var n float64
	if _, err := fmt.Sscanf(string(dump), "goroutine profile: total %g", &n); err != nil {
		return 0, nil, fmt.Errorf("goroutine dump: no total in %.40q", dump)
	}
	return n, dump, nil
}

// readBoth reads both daemons' state and, with -pprof, writes their heap
// profiles to soak-{relay,agent}-{when}.pprof (for `go tool pprof -base`)
// and their goroutines to soak-{relay,agent}-{when}-goroutines.txt.
func (s *setup) readBoth(when string) (relay, agent daemonState, err error) {
	var rp, ap daemonDumps
	if relay, rp, err = readDaemon(s.relay.Process.Pid, s.adminAddr,
		`ferry_relay_streams_in_flight{tunnel="bench"}`, `ferry_relay_agent_connections{tunnel="bench"}`); err != nil {
		return relay, agent, fmt.Errorf("relay: %w", err)
	}
	if agent, ap, err = readDaemon(s.agent.Process.Pid, s.diagAddr, "ferry_agent_streams_in_flight", "ferry_agent_relay_connections"); err != nil {
		return relay, agent, fmt.Errorf("agent: %w", err)
	}
	if s.keepProfiles {
		for name, d := range map[string]daemonDumps{"relay": rp, "agent": ap} {
			base := fmt.Sprintf("soak-%s-%s", name, when)
			if err := os.WriteFile(base+".pprof", d.heap, 0o644); err != nil {
				return relay, agent, err
			}
			if err := os.WriteFile(base+"-goroutines.txt", d.goroutines, 0o644); err != nil {
				return relay, agent, err
			}
			fmt.Fprintf(os.Stderr, "bench: %s heap profile and goroutines written to %s.pprof and %[2]s-goroutines.txt\n", name, base)
		}
	}
	return relay, agent, nil
}

// soak sends mixed traffic through ferry for dur — small requests,
// refusals, scanners that give up mid-request, bulk transfers cut short,
// git clones, the agent's connections cut now and then — between two
// quiet spells, and reports whether each daemon came back to what it held
// before: goroutines and open files exactly, the live heap within a
// margin. A daemon meant to run for months must not keep anything a
// request left behind.
func (s *setup) soak(dur time.Duration) ([]Result, error) {
	fail := func(err error) ([]Result, error) {
		return []Result{{Workload: "soak"}}, err
	}
	if err := makeRepo(s.gitRoot(), "soak/repo.git", 4); err != nil {
		return fail(err)
	}
	fmt.Fprintf(os.Stderr, "bench: soak: warm-up, then %v quiet\n", soakQuiet)
	if _, err := s.soakTraffic(20*time.Second, false); err != nil {
		return fail(fmt.Errorf("warm-up: %w", err))
	}
	s.viaFerry.CloseIdleConnections()
	time.Sleep(soakQuiet)
	relay0, agent0, err := s.readBoth("before")
	if err != nil {
		return fail(err)
	}
	fmt.Fprintf(os.Stderr, "bench: soak: before: relay %v; agent %v\n", relay0, agent0)
	counts, err := s.soakTraffic(dur, true)
	if err != nil {
		return fail(err)
	}
	// Back to the configs the "before" reading had.
	if err := s.reloadBoth(false); err != nil {
		return fail(err)
	}
	s.viaFerry.CloseIdleConnections()
	fmt.Fprintf(os.Stderr, "bench: soak: %s; %v quiet\n", counts, soakQuiet)
	time.Sleep(soakQuiet)
	if err := s.reloadsTook(); err != nil {
		return fail(err)
	}
	relay1, agent1, err := s.readBoth("after")
	if err != nil {
		return fail(err)
	}
	mk := func(name string, before, after daemonState) Result {
		r := Result{Workload: fmt.Sprintf("soak %v, %s, goroutines after", dur, name), Unit: "goroutines", Ferry: after.goroutines,
			Target: "as before"}
		// The live heap may keep what is made once and kept (a grown
		// map, a metric's series); 1 MiB is far below what a leak per
		// request would leave after hundreds of thousands of them.
		r.Met = after.goroutines <= before.goroutines && after.files <= before.files && after.liveHeap <= before.liveHeap+(1<<20) &&
			after.inFlight == 0 && after.tunnelConns == before.tunnelConns && before.tunnelConns > 0 // 0: the metric was not found
		r.Note = fmt.Sprintf("before: %v; after: %v; traffic: %s", before, after, counts)
		return r
	}
	return []Result{mk("relay", relay0, relay1), mk("agent", agent0, agent1)}, nil
}

// soakCounts is what the soak's traffic did.
type soakCounts struct {
	ok, refused, cancelled, cut, clones atomic.Int64
	cuts, lostToCuts, reloads           atomic.Int64
	longestOutage                       atomic.Int64 // ns from a cut to the next request through
}

func (c *soakCounts) noteOutage(d time.Duration) {
	for {
		old := c.longestOutage.Load()
		if int64(d) <= old || c.longestOutage.CompareAndSwap(old, int64(d)) {
			return
		}
	}
}

func (c *soakCounts) String() string {
	return fmt.Sprintf("%d requests answered, %d refused as expected, %d abandoned by the scanner, %d bulk transfers cut short, %d clones; agent connections cut %d times, %d requests lost to the cuts, through again within %v; %d reloads",
		c.ok.Load(), c.refused.Load(), c.cancelled.Load(), c.cut.Load(), c.clones.Load(), c.cuts.Load(), c.lostToCuts.Load(),
		time.Duration(c.longestOutage.Load()).Round(time.Millisecond), c.reloads.Load())
}

const (
	// cutEvery is how often the soak cuts the agent's connections.
	cutEvery = 45 * time.Second
	// cutGrace: a request that fails this soon after a cut is counted as
	// lost to it, not as an error; the agent is reconnecting.
	cutGrace = 5 * time.Second
	// reloadEvery is how often the soak reloads both daemons.
	reloadEvery = 7 * time.Second
)

// reloadBoth rewrites both daemons' configs and sends them SIGHUP; it
// fails if either refused its reload before. With more set, the agent has
// 3 relay connections (else 2) and a second upstream, and the relay
// another agent_response (which rebuilds its transport to other
// replicas); without, both have the configs they started with.
func (s *setup) reloadBoth(more bool) error {
	if err := s.reloadsTook(); err != nil {
		return err
	}
	spare := fmt.Sprintf("  - name: spare\n    url: %s\n    ca_file: %s\n    auth: {type: bearer, token_file: %s}\n    profile: bitbucket-dc-read\n",
		s.upstream, s.pki.CAFile, filepath.Join(s.dir, "pat"))
	agent := func(y string) string {
		y = strings.Replace(y, spare, "", 1)
		if !more {
			return connectionsRE.ReplaceAllString(y, "connections: 2}")
		}
		return strings.Replace(connectionsRE.ReplaceAllString(y, "connections: 3}"), "diagnostics:", spare+"diagnostics:", 1)
	}
	const timeouts = "timeouts: {agent_response: 151s}\n"
	relay := func(y string) string {
		if y = strings.Replace(y, timeouts, "", 1); more {
			y += timeouts
		}
		return y
	}
	if err := rewrite(s.agentCfg, agent); err != nil {
		return err
	}
	if err := rewrite(s.relayCfg, relay); err != nil {
		return err
	}
	return errors.Join(s.agent.Process.Signal(syscall.SIGHUP), s.relay.Process.Signal(syscall.SIGHUP))
}

// rewrite replaces a file's contents with edit's, by a rename, so that a
// daemon never reads it half-written.
func rewrite(path string, edit func(string) string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if err := os.WriteFile(path+".new", []byte(edit(string(b))), 0o600); err != nil {
		return err
	}
	return os.Rename(path+".new", path)
}

// reloadsTook fails if either daemon refused its last config reload.
func (s *setup) reloadsTook() error {
	if metric(s.diagAddr, "ferry_agent_config_last_reload_successful") != 1 || s.relayGauge("ferry_relay_config_last_reload_successful") != 1 {
		return errors.New("a config reload was refused (see the daemons' logs)")
	}
	return nil
}

var connectionsRE = regexp.MustCompile(`connections: \d+\}`)

// cutAgentConnections resets the agent's connections to the relay, as a
// failing network or firewall would: ss -K destroys the agent's sockets
// (the relay then reads a reset), and both processes live on.
func (s *setup) cutAgentConnections() error {
	host, port, err := net.SplitHostPort(s.agentAddr)
	if err != nil {
		return err
	}
	out, err := exec.Command("ss", "-K", "-t", "-n", "dst", host, "dport", "=", ":"+port).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ss -K: %v: %s", err, out)
	}
	if !bytes.Contains(out, []byte("ESTAB")) {
		// The kernel lacks CONFIG_INET_DIAG_DESTROY, or ss is too old.
		return fmt.Errorf("ss -K cut no connection: %q", out)
	}
	return nil
}

// soakTraffic runs the soak's workers for dur, cutting the agent's
// connections to the relay every cutEvery if cuts is set. Each kind of
// traffic runs in a loop of its own, paced so the machine is busy but not
// saturated: the point is many requests of every kind, not the rate.
func (s *setup) soakTraffic(dur time.Duration, cuts bool) (*soakCounts, error) {
	ctx, cancel := context.WithTimeout(context.Background(), dur)
	defer cancel()
	c := &soakCounts{}
	var firstErr error
	var errOnce sync.Once
	failed := func(err error) {
		errOnce.Do(func() { firstErr = err; cancel() })
	}
	var lastCut atomic.Int64 // when the agent's connections were last cut, Unix ns
	var wg sync.WaitGroup
	loop := func(pause time.Duration, f func(i int) error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ctx.Err() == nil; i++ {
				if err := f(i); err != nil && ctx.Err() == nil {
					if t := lastCut.Load(); t == 0 || time.Since(time.Unix(0, t)) >= cutGrace {
						failed(err)
						return
					}
					c.lostToCuts.Add(1)
				}
				select {
				case <-ctx.Done():
				case <-time.After(pause):
				}
			}
		}()
	}
	// Small requests on kept connections, some refused by the relay (no
	// such tunnel) or by the agent (outside the rules).
	for range 4 {
		loop(2*time.Millisecond, func(i int) error {
			url, want := s.ferryURL("/bench/small"), http.StatusOK
			switch i % 20 {
			case 5:
				url, want = s.ferryURL("/not-allowed"), http.StatusForbidden
			case 10:
				url, want = "http://"+s.scanAddr+"/t/no-such-tunnel/bitbucket/bench/small", http.StatusNotFound
			}
			return s.soakGet(ctx, c, url, s.scannerTok, want, false)
		})
	}
	// A wrong token now and then, slower than the relay's allowance for
	// failed authentication (one per 3 s after a burst), which would
	// answer everyone from this address 429.
	loop(4*time.Second, func(int) error {
		return s.soakGet(ctx, c, s.ferryURL("/bench/small"), "wrong-token", http.StatusUnauthorized, false)
	})
	// A scanner that opens a connection per request.
	loop(10*time.Millisecond, func(int) error {
		return s.soakGet(ctx, c, s.ferryURL("/bench/small"), s.scannerTok, http.StatusOK, true)
	})
	// Scanners that give up while the upstream is still answering: the
	// relay must cut the stream and the agent the upstream request.
	loop(10*time.Millisecond, func(int) error {
		rctx, rcancel := context.WithTimeout(ctx, 30*time.Millisecond)
		defer rcancel()
		req, err := scannerRequest(rctx, "GET", s.ferryURL("/bench/slow?ms=200"), s.scannerTok, nil)
		if err != nil {
			return err
		}
		resp, err := s.viaFerry.Do(req)
		if err == nil {
			resp.Body.Close()
			return fmt.Errorf("slow request answered %s before the scanner gave up", resp.Status)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			c.cancelled.Add(1)
			return nil
		}
		return err
	})
	// Bulk transfers, every other one cut short by the scanner.
	loop(100*time.Millisecond, func(i int) error {
		const size = 32 << 20
		cut := i%2 == 1
		if i%4 < 2 {
			return s.soakDownload(ctx, c, size, cut)
		}
		return s.soakUpload(ctx, c, size, cut)
	})
	// git clones.
	loop(time.Second, func(int) error {
		dst := filepath.Join(s.dir, fmt.Sprintf("soak-clone-%d", time.Now().UnixNano()))
		defer os.RemoveAll(dst)
		cmd := exec.CommandContext(ctx, "git", "-c", "http.extraHeader=Authorization: Bearer "+s.scannerTok, "clone", "-q", s.ferryURL("/scm/soak/repo.git"), dst)
		cmd.Env = testrig.GitEnv()
		if out, err := cmd.CombinedOutput(); err != nil {
			if ctx.Err() != nil {
				return nil // the soak ended mid-clone
			}
			return fmt.Errorf("git clone: %v: %s", err, out)
		}
		c.clones.Add(1)
		return nil
	})
	// every runs f every d until the traffic ends or f returns false.
	every := func(d time.Duration, f func() bool) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := time.NewTicker(d)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
				if !f() {
					return
				}
			}
		}()
	}
	// Network failures: the agent's connections to the relay cut (reset)
	// now and then. Requests in flight on them are lost; after a few
	// seconds the agent must be back and every request answered again.
	if cuts {
		every(cutEvery, func() bool {
			cut := time.Now()
			lastCut.Store(cut.UnixNano())
			err := s.cutAgentConnections()
			lastCut.Store(time.Now().UnixNano())
			if err != nil {
				fmt.Fprintf(os.Stderr, "bench: soak: going on without cutting connections: %v\n", err)
				return false
			}
			c.cuts.Add(1)
			// How long the tunnel was down: until a request gets
			// through again.
			for ctx.Err() == nil && time.Since(cut) < cutGrace {
				if s.soakGet(ctx, &soakCounts{}, s.ferryURL("/bench/small"), s.scannerTok, http.StatusOK, false) == nil {
					c.noteOutage(time.Since(cut))
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			return true
		})
	}
	// Config reloads, as configuration management makes them: the
	// agent's relay.connections alternate between 3 and 2 (a connection
	// added, then drained and closed) and an upstream comes and goes; the
	// relay's agent_response changes. No request may fail for them.
	if cuts {
		every(reloadEvery, func() bool {
			if err := s.reloadBoth(c.reloads.Load()%2 == 0); err != nil {
				failed(err)
				return false
			}
			c.reloads.Add(1)
			return true
		})
	}
	// Progress, so a long soak shows it is alive and how the daemons fare.
	every(30*time.Second, func() bool {
		rr, _ := procStatus(s.relay.Process.Pid, "VmRSS")
		ar, _ := procStatus(s.agent.Process.Pid, "VmRSS")
		fmt.Fprintf(os.Stderr, "bench: soak: %s; relay %.0f goroutines, RSS %.1f MiB; agent %.0f goroutines, RSS %.1f MiB\n", c,
			s.relayGauge("go_goroutines"), rr/(1<<20), metric(s.diagAddr, "go_goroutines"), ar/(1<<20))
		return true
	})
	wg.Wait()
	return c, firstErr
}

// scannerRequest is a request to the relay with the scanner token tok.
func scannerRequest(ctx context.Context, method, url, tok string, body io.Reader) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+tok)
	return req, nil
}

func (s *setup) soakGet(ctx context.Context, c *soakCounts, url, tok string, want int, closeConn bool) error {
	req, err := scannerRequest(ctx, "GET", url, tok, nil)
	if err != nil {
		return err
	}
	req.Close = closeConn
	resp, err := s.viaFerry.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != want {
		return fmt.Errorf("GET %s: status %d, want %d", url, resp.StatusCode, want)
	}
	if want == http.StatusOK {
		c.ok.Add(1)
	} else {
		c.refused.Add(1)
	}
	return nil
}

func (s *setup) soakDownload(ctx context.Context, c *soakCounts, size int64, cut bool) error {
	req, err := scannerRequest(ctx, "GET", s.ferryURL("/bench/blob?size="+strconv.FormatInt(size, 10)), s.scannerTok, nil)
	if err != nil {
		return err
	}
	resp, err := s.viaFerry.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	defer resp.Body.Close()
	want := size
	if cut {
		want = size / 8
	}
	n, err := io.CopyN(io.Discard, resp.Body, want)
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		return fmt.Errorf("download: read %d of %d: %w", n, want, err)
	}
	if cut {
		c.cut.Add(1) // Close drops the connection with the rest unread
	} else {
		c.ok.Add(1)
	}
	return nil
}

// errCutShort is what the soak's upload body returns part way.
var errCutShort = errors.New("the scanner stopped sending")

func (s *setup) soakUpload(ctx context.Context, c *soakCounts, size int64, cut bool) error {
	var body io.Reader = &repeatReader{left: size}
	if cut {
		body = io.MultiReader(io.LimitReader(body, size/8), iotest.ErrReader(errCutShort))
	}
	req, err := scannerRequest(ctx, "POST", s.ferryURL("/bench/sink"), s.scannerTok, body)
	if err != nil {
		return err
	}
	req.ContentLength = size
	resp, err := s.viaFerry.Do(req)
	if ctx.Err() != nil {
		if err == nil {
			resp.Body.Close()
		}
		return nil
	}
	if cut {
		if err == nil {
			resp.Body.Close()
			return fmt.Errorf("upload cut short was answered %s", resp.Status)
		}
		if !errors.Is(err, errCutShort) {
			return fmt.Errorf("upload cut short: %w", err)
		}
		c.cut.Add(1)
		return nil
	}
	if err != nil {
		return err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if strings.TrimSpace(string(b)) != strconv.FormatInt(size, 10) {
		return fmt.Errorf("upload: sink got %q of %d (status %d)", b, size, resp.StatusCode)
	}
	c.ok.Add(1)
	return nil
}
