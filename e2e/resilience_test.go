package e2e

import (
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// startRawGET starts a GET and returns the response with its body unread.
func startRawGET(t *testing.T, client *http.Client, url, tok string) *http.Response {
	t.Helper()
	req, _ := http.NewRequest("GET", url, nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

func TestTunnelBusyAtStreamLimit(t *testing.T) {
	w := newWorld(t)
	withLimit := func(n int) string {
		return w.relayYAMLWith("127.0.0.1:0", "127.0.0.1:0", fmt.Sprintf("limits: {max_streams_per_tunnel: %d}\n", n))
	}
	r, rrun := w.startRelayYAML(withLimit(2))
	defer rrun.shutdown(t)
	reload := func(n int) {
		t.Helper()
		w.write("relay.yaml", withLimit(n))
		if err := r.Reload(); err != nil {
			t.Fatal(err)
		}
	}
	a, arun := w.startAgent(r.AgentAddr(), "")
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	w.bb.AddSynthetic("PROJ", "app", "slow.bin", testrig.Synthetic{Size: 4 << 20, BytesPerSec: 256 << 10})
	client := newClient()
	defer client.CloseIdleConnections()
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	slow1 := startRawGET(t, client, base+"/raw/slow.bin", scannerToken)
	slow2 := startRawGET(t, client, base+"/raw/slow.bin", scannerToken)
	resp := startRawGET(t, client, base, scannerToken)
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" || errorBody(t, string(b)).Error != "tunnel_busy" {
		t.Fatalf("third request at the limit: %d %s", resp.StatusCode, b)
	}
	// The limit changes on reload, with the two slow requests still in
	// flight: raised, a third gets through; lowered, it is refused again.
	get := func() (int, string) {
		resp := startRawGET(t, client, base, scannerToken)
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp.StatusCode, string(b)
	}
	reload(3)
	if code, b := get(); code != 200 {
		t.Fatalf("third request after raising the limit to 3: %d %s", code, b)
	}
	reload(1)
	if code, b := get(); code != 503 || !strings.Contains(b, "tunnel_busy") {
		t.Fatalf("request after lowering the limit to 1, two in flight: %d %s", code, b)
	}
	reload(2)
	slow1.Body.Close()
	slow2.Body.Close()
	waitFor(t, "slots free again", func() bool {
		resp := startRawGET(t, client, base, scannerToken)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

func TestAgentSIGTERMDrainsSlowDownload(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	const size = 64 << 20
	syn := testrig.Synthetic{Size: size, Seed: [32]byte{3}, BytesPerSec: 24 << 20}
	w.bb.AddSynthetic("PROJ", "app", "big.bin", syn)
	want := sha256.New()
	io.Copy(want, syn.Reader())

	relayProc := startProc(t, "relay", relayBin, "--config", w.write("relay.yaml", w.relayYAML("127.0.0.1:0")))
	started := relayProc.waitLog("relay started")
	base := "http://" + started["scanner_listen"].(string) + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	agentProc := startProc(t, "agent", agentBin, "--config", w.write("agent.yaml", w.agentYAML(started["agent_listen"].(string), "")))
	agentProc.waitLog("connected to relay")
	waitFor(t, "both connections", func() bool { return len(procLogs(agentProc, "connected to relay")) == 2 })

	client := newClient()
	defer client.CloseIdleConnections()
	// These leave kept streams idle on the relay, which must not hold the
	// drain up: the relay closes them when the agent says it drains.
	for range 3 {
		r := startRawGET(t, client, base, scannerToken)
		io.Copy(io.Discard, r.Body)
		r.Body.Close()
	}
	resp := startRawGET(t, client, base+"/raw/big.bin", scannerToken)
	if resp.StatusCode != 200 {
		t.Fatalf("download: %d", resp.StatusCode)
	}
	got := sha256.New()
	if _, err := io.CopyN(got, resp.Body, 4<<20); err != nil {
		t.Fatal(err)
	}
	agentProc.cmd.Process.Signal(syscall.SIGTERM)
	agentProc.waitLog("agent draining: no new requests; waiting for those in flight")
	// A request the relay routed before the agent's word arrived is
	// served (the agent loses nothing on its way); once the relay has it
	// on both connections, new requests are refused at once, not queued.
	waitFor(t, "the relay to take both connections out of routing", func() bool {
		return len(procLogs(relayProc, "agent is draining; no new requests go to this connection")) == 2
	})
	start := time.Now()
	during := startRawGET(t, client, base, scannerToken)
	io.Copy(io.Discard, during.Body)
	during.Body.Close()
	if during.StatusCode != 503 || time.Since(start) > 5*time.Second {
		t.Fatalf("request during drain: %d after %v", during.StatusCode, time.Since(start))
	}

	n, err := io.Copy(got, resp.Body)
	resp.Body.Close()
	if err != nil || n+4<<20 != size || string(got.Sum(nil)) != string(want.Sum(nil)) {
		t.Fatalf("download across SIGTERM: %d bytes, err %v, checksum ok=%v", n+4<<20, err, string(got.Sum(nil)) == string(want.Sum(nil)))
	}
	select {
	case <-agentProc.done:
	case <-time.After(40 * time.Second):
		t.Fatal("agent did not exit after the drain")
	}
	if agentProc.err != nil {
		t.Fatalf("agent exit: %v", agentProc.err)
	}
	agentProc.waitLog("drained: no requests in flight")
	relayProc.signal(syscall.SIGTERM)
}

func procLogs(p *proc, msg string) []map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []map[string]any
	for _, m := range p.logs {
		if m["msg"] == msg {
			out = append(out, m)
		}
	}
	return out
}

// load sends GETs from n workers until stop closes, counting outcomes.
type load struct {
	ok, failed atomic.Int64
	stop       chan struct{}
	wg         sync.WaitGroup

	mu      sync.Mutex
	reasons []string // the first failures, so that a failing test says why
}

// fail counts a failed request and keeps the first few reasons.
func (l *load) fail(resp *http.Response, body []byte, err error) {
	l.failed.Add(1)
	why := time.Now().Format("15:04:05.000 ")
	if err != nil {
		why += err.Error()
	} else {
		why += fmt.Sprintf("%s %.200s", resp.Status, body)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.reasons) < 5 {
		l.reasons = append(l.reasons, why)
	}
}

// why is the first failures' reasons, one a line.
func (l *load) why() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.reasons, "\n")
}

func startLoad(t *testing.T, n int, url string) *load {
	l := &load{stop: make(chan struct{})}
	for i := 0; i < n; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			client := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
			defer client.CloseIdleConnections()
			for {
				select {
				case <-l.stop:
					return
				default:
				}
				req, _ := http.NewRequest("GET", url, nil)
				req.Header.Set("Authorization", "Bearer "+scannerToken)
				resp, err := client.Do(req)
				var body []byte
				if err == nil {
					body, err = io.ReadAll(resp.Body)
					resp.Body.Close()
				}
				if err == nil && resp.StatusCode == 200 {
					l.ok.Add(1)
				} else {
					l.fail(resp, body, err)
					time.Sleep(5 * time.Millisecond)
				}
			}
		}()
	}
	return l
}

func (l *load) finish() { close(l.stop); l.wg.Wait() }

func TestOneOfTwoAgentsDiesMidLoad(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	relayProc := startProc(t, "relay", relayBin, "--config", w.write("relay.yaml", w.relayYAML("127.0.0.1:0")))
	started := relayProc.waitLog("relay started")
	cfg := w.agentYAML(started["agent_listen"].(string), "")
	agentA := startProc(t, "agent-a", agentBin, "--config", w.write("agent-a.yaml", strings.Replace(cfg, "agent_id: test-agent", "agent_id: agent-a", 1)))
	agentB := startProc(t, "agent-b", agentBin, "--config", w.write("agent-b.yaml", strings.Replace(cfg, "agent_id: test-agent", "agent_id: agent-b", 1)))
	waitFor(t, "four connections", func() bool {
		return len(procLogs(agentA, "connected to relay"))+len(procLogs(agentB, "connected to relay")) == 4
	})
	url := "http://" + started["scanner_listen"].(string) + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app/branches"
	const workers = 8
	l := startLoad(t, workers, url)
	waitFor(t, "traffic", func() bool { return l.ok.Load() > 200 })
	agentA.cmd.Process.Signal(syscall.SIGKILL)
	<-agentA.done
	before := l.ok.Load()
	waitFor(t, "traffic after the kill", func() bool { return l.ok.Load() > before+300 })
	l.finish()
	if f := l.failed.Load(); f > workers {
		t.Fatalf("%d requests failed; at most the %d in flight on the dead agent may", f, workers)
	}
	t.Logf("%d requests succeeded, %d failed (in flight on the killed agent)", l.ok.Load(), l.failed.Load())
	agentB.signal(syscall.SIGTERM)
	relayProc.signal(syscall.SIGTERM)
}

func TestKill9AndRestartDuringTraffic(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	// The restarted relay must come back on the same addresses.
	agentAddr, scannerAddr := stableAddr(t), stableAddr(t)
	fixed := w.write("relay.yaml", w.relayYAMLWith(agentAddr, scannerAddr, ""))
	relayProc := startProc(t, "relay", relayBin, "--config", fixed)
	relayProc.waitLog("relay started")
	agentCfg := w.write("agent.yaml", w.agentYAML(agentAddr, ""))
	agentProc := startProc(t, "agent", agentBin, "--config", agentCfg)
	agentProc.waitLog("connected to relay")
	url := "http://" + scannerAddr + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects/PROJ/repos/app"
	l := startLoad(t, 4, url)
	defer l.finish()
	waitFor(t, "traffic", func() bool { return l.ok.Load() > 100 })

	// Relay: kill -9, restart on the same addresses.
	relayProc.cmd.Process.Signal(syscall.SIGKILL)
	<-relayProc.done
	relay2 := startProc(t, "relay2", relayBin, "--config", fixed)
	relay2.waitLog("relay started")
	back := time.Now()
	n := l.ok.Load()
	waitFor(t, "requests succeed after the relay restart", func() bool { return l.ok.Load() > n+20 })
	t.Logf("requests succeeded again %v after the relay was back", time.Since(back).Round(10*time.Millisecond))

	// Agent: kill -9, restart.
	agentProc.cmd.Process.Signal(syscall.SIGKILL)
	<-agentProc.done
	waitFor(t, "503 while no agent", func() bool {
		resp := startRawGET(t, newClient(), url, scannerToken)
		resp.Body.Close()
		return resp.StatusCode == 503
	})
	agent2 := startProc(t, "agent2", agentBin, "--config", agentCfg)
	agent2.waitLog("connected to relay")
	n = l.ok.Load()
	waitFor(t, "requests succeed after the agent restart", func() bool { return l.ok.Load() > n+20 })
	l.finish()
	l.stop = make(chan struct{}) // finish is deferred too
	agent2.signal(syscall.SIGTERM)
	relay2.signal(syscall.SIGTERM)
}

// middlebox forwards TCP to target and cuts any connection that has been
// idle (no byte either way) for longer than cut, like a cloud NAT or load
// balancer does.
type middlebox struct {
	ln   net.Listener
	cuts atomic.Int64
	wg   sync.WaitGroup
	done chan struct{}
}

func startMiddlebox(t *testing.T, target string, cut time.Duration) *middlebox {
	m := &middlebox{ln: listenLocal(t), done: make(chan struct{})}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		for {
			c, err := m.ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			var last atomic.Int64
			last.Store(time.Now().UnixNano())
			pipe := func(dst, src net.Conn) {
				defer m.wg.Done()
				buf := make([]byte, 32<<10)
				for {
					n, err := src.Read(buf)
					if n > 0 {
						last.Store(time.Now().UnixNano())
						if _, werr := dst.Write(buf[:n]); werr != nil {
							break
						}
					}
					if err != nil {
						break
					}
				}
				dst.Close()
				src.Close()
			}
			m.wg.Add(3)
			go pipe(up, c)
			go pipe(c, up)
			go func() {
				defer m.wg.Done()
				tick := time.NewTicker(50 * time.Millisecond)
				defer tick.Stop()
				for {
					select {
					case <-m.done:
						c.Close()
						up.Close()
						return
					case <-tick.C:
						if time.Since(time.Unix(0, last.Load())) > cut {
							m.cuts.Add(1)
							c.Close()
							up.Close()
							return
						}
					}
				}
			}()
		}
	}()
	return m
}

func (m *middlebox) close() { close(m.done); m.ln.Close(); m.wg.Wait() }

func TestTunnelSurvivesIdleCuttingMiddlebox(t *testing.T) {
	for _, c := range []struct {
		name      string
		keepalive string
		survive   bool
	}{
		{"keepalive below the idle cut", "300ms", true},
		{"control: keepalive above the idle cut", "20s", false},
	} {
		t.Run(c.name, func(t *testing.T) {
			w := newWorld(t)
			timeouts := "timeouts: {keepalive: " + c.keepalive + "}\n"
			r, rrun := w.startRelayYAML(w.relayYAMLWith("127.0.0.1:0", "127.0.0.1:0", timeouts))
			defer rrun.shutdown(t)
			mb := startMiddlebox(t, r.AgentAddr(), 1500*time.Millisecond)
			defer mb.close()
			a, arun := w.startAgentYAML(w.agentYAML(mb.ln.Addr().String(), "") + timeouts)
			defer arun.shutdown(t)
			waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
			time.Sleep(4 * time.Second) // a quiet tunnel, well past the middlebox's idle cut
			reconnects := testutil.ToFloat64(a.Metrics().Reconnects)
			if c.survive && (mb.cuts.Load() != 0 || reconnects != 0) {
				t.Fatalf("the quiet tunnel was cut %d times (%v reconnects)", mb.cuts.Load(), reconnects)
			}
			if !c.survive && mb.cuts.Load() == 0 {
				t.Fatal("the middlebox cut nothing: the control proves nothing")
			}
			if c.survive {
				e := &env{world: w, client: newClient()}
				defer e.client.CloseIdleConnections()
				if s, _, b := e.do("GET", "http://"+r.ScannerAddr()+"/t/"+tunnelID+"/bitbucket/rest/api/1.0/projects/PROJ", scannerToken, nil, nil); s != 200 {
					t.Fatalf("after the quiet period: %d %s", s, b)
				}
			}
		})
	}
}

func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestSoakResourcesStayFlat(t *testing.T) {
	e := newEnv(t)
	e.bb.AddSynthetic("PROJ", "app", "mid.bin", testrig.Synthetic{Size: 256 << 10, Seed: [32]byte{5}})
	paths := []string{"/rest/api/1.0/projects/PROJ/repos/app", "/rest/api/1.0/projects/PROJ/repos/app/branches",
		"/rest/api/1.0/projects/PROJ/repos/app/raw/mid.bin", "/rest/api/1.0/admin/users"}
	run := func(n int) (ok, denied int64) {
		var okc, deniedc atomic.Int64
		var wg sync.WaitGroup
		jobs := make(chan string)
		for i := 0; i < 16; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for p := range jobs {
					req, _ := http.NewRequest("GET", e.scannerBase+p, nil)
					req.Header.Set("Authorization", "Bearer "+scannerToken)
					resp, err := e.client.Do(req)
					if err != nil {
						t.Error(err)
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					switch resp.StatusCode {
					case 200:
						okc.Add(1)
					case 403:
						deniedc.Add(1)
					default:
						t.Errorf("%s: %d", p, resp.StatusCode)
					}
				}
			}()
		}
		for i := 0; i < n; i++ {
			jobs <- paths[i%len(paths)]
		}
		close(jobs)
		wg.Wait()
		return okc.Load(), deniedc.Load()
	}
	settle := func() (goroutines, fds int, heap uint64) {
		// Idle pools on both sides of the agent go: how many a load
		// leaves idle depends on its timing, not on leaks.
		e.client.CloseIdleConnections()
		e.agent.CloseIdleConnections()
		time.Sleep(200 * time.Millisecond)
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return runtime.NumGoroutine(), openFDs(t), ms.HeapAlloc
	}
	// Warm up (buffer pools, the credential check); what follows must
	// then stay flat: a per-request leak would show in the thousands.
	run(1000)
	g0, f0, h0 := settle()
	const n = 4000
	ok, denied := run(n)
	if ok+denied != n || denied != n/4 {
		t.Fatalf("%d ok, %d denied of %d", ok, denied, n)
	}
	var g1, f1 int
	var h1 uint64
	deadline := time.Now().Add(10 * time.Second)
	for {
		g1, f1, h1 = settle()
		if (g1 <= g0+8 && f1 <= f0+8) || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("after %d requests: goroutines %d→%d, fds %d→%d, heap %d→%d KiB", n, g0, g1, f0, f1, h0>>10, h1>>10)
	if g1 > g0+8 || f1 > f0+8 {
		t.Fatalf("resources grew: goroutines %d→%d, fds %d→%d", g0, g1, f0, f1)
	}
	if h1 > h0+16<<20 {
		t.Fatalf("heap grew from %d to %d KiB", h0>>10, h1>>10)
	}
}

func TestStalledScannerDoesNotStallOthers(t *testing.T) {
	e := newEnv(t)
	e.bb.AddSynthetic("PROJ", "app", "big.bin", testrig.Synthetic{Size: 512 << 20, Seed: [32]byte{8}})
	// One scanner starts a 512 MiB download and stops reading after 1 MiB.
	stalled := startRawGET(t, e.client, e.scannerBase+"/rest/api/1.0/projects/PROJ/repos/app/raw/big.bin", scannerToken)
	if _, err := io.CopyN(io.Discard, stalled.Body, 1<<20); err != nil {
		t.Fatal(err)
	}
	defer stalled.Body.Close()
	time.Sleep(500 * time.Millisecond) // let every buffer on the way fill up
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	// Others are served meanwhile, on the same tunnel connections.
	client := newClient()
	defer client.CloseIdleConnections()
	for i := 0; i < 200; i++ {
		resp := startRawGET(t, client, e.scannerBase+"/rest/api/1.0/projects/PROJ/repos/app", scannerToken)
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d next to a stalled download: %d", i, resp.StatusCode)
		}
	}
	// Backpressure held the stalled body in bounded windows, not in memory.
	if ms.HeapInuse > 64<<20 {
		t.Fatalf("heap in use %d MiB with a stalled 512 MiB download", ms.HeapInuse>>20)
	}
	t.Logf("heap in use with a stalled 512 MiB download: %d MiB", ms.HeapInuse>>20)

	// The scanner leaves: the agent must free the request (and stop
	// reading Bitbucket) promptly, not when some timeout fires.
	stalled.Body.Close()
	gone := time.Now()
	for testutil.ToFloat64(e.agent.Metrics().StreamsInFlight) != 0 {
		if time.Since(gone) > 5*time.Second {
			t.Fatal("the agent still serves the abandoned download 5 s after the scanner left")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
