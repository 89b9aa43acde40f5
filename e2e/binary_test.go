package e2e

import (
	"bufio"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// binaries builds ferry-relay and ferry-agent once per test run.
func binaries(t *testing.T) (relayBin, agentBin string) {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "ferry-bin-")
		if buildErr != nil {
			return
		}
		removeBinaries = func() { os.RemoveAll(binDir) }
		cmd := exec.Command("go", "build", "-o", binDir+"/", "../cmd/ferry-relay", "../cmd/ferry-agent")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return filepath.Join(binDir, "ferry-relay"), filepath.Join(binDir, "ferry-agent")
}

// proc is a daemon under test. Its JSON log lines are collected; the
// collecting goroutine ends when the process's stderr closes.
type proc struct {
	t    *testing.T
	name string
	cmd  *exec.Cmd
	mu   sync.Mutex
	logs []map[string]any
	raw  []string
	done chan struct{} // closed when stderr is drained and Wait returned
	err  error
}

func startProc(t *testing.T, name, bin string, args ...string) *proc {
	t.Helper()
	p := &proc{t: t, name: name, cmd: exec.Command(bin, args...), done: make(chan struct{})}
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			var m map[string]any
			json.Unmarshal([]byte(line), &m)
			p.mu.Lock()
			p.raw = append(p.raw, line)
			if m != nil {
				p.logs = append(p.logs, m)
			}
			p.mu.Unlock()
			if testing.Verbose() {
				fmt.Fprintf(os.Stderr, "[%s] %s\n", name, line)
			}
		}
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
	})
	return p
}

// waitLog waits up to 15 s for a log line with msg and returns it.
func (p *proc) waitLog(msg string) map[string]any {
	p.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		p.mu.Lock()
		for _, m := range p.logs {
			if m["msg"] == msg {
				p.mu.Unlock()
				return m
			}
		}
		p.mu.Unlock()
		select {
		case <-p.done:
			p.t.Fatalf("%s exited (%v) before logging %q:\n%s", p.name, p.err, msg, strings.Join(p.raw, "\n"))
		case <-time.After(20 * time.Millisecond):
		}
	}
	p.t.Fatalf("%s did not log %q in 15s", p.name, msg)
	return nil
}

// findLog waits up to wait for a log line that match accepts.
func (p *proc) findLog(match func(map[string]any) bool, wait time.Duration) map[string]any {
	deadline := time.Now().Add(wait)
	for {
		p.mu.Lock()
		for _, m := range p.logs {
			if match(m) {
				p.mu.Unlock()
				return m
			}
		}
		p.mu.Unlock()
		if time.Now().After(deadline) {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// rawLog is everything the process wrote to stderr so far.
func (p *proc) rawLog() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.raw, "\n")
}

// signal sends sig and waits up to 40 s for the exit; it returns the exit code.
func (p *proc) signal(sig syscall.Signal) int {
	p.t.Helper()
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(40 * time.Second):
		p.t.Fatalf("%s did not exit after %v", p.name, sig)
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	return 0
}

func TestBinariesEndToEnd(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	relayCfg := w.write("relay.yaml", w.relayYAML("127.0.0.1:0"))
	relayProc := startProc(t, "relay", relayBin, "--config", relayCfg)
	started := relayProc.waitLog("relay started")
	agentAddr, scannerAddr := started["agent_listen"].(string), started["scanner_listen"].(string)

	agentCfg := w.write("agent.yaml", w.agentYAML(agentAddr, ""))
	startAgent := func() (*proc, string) {
		p := startProc(t, "agent", agentBin, "--config", agentCfg)
		diag := p.waitLog("agent started")["diagnostics"].(string)
		waitFor(t, "agent ready", func() bool {
			resp, err := http.Get("http://" + diag + "/readyz")
			if err != nil {
				return false
			}
			resp.Body.Close()
			return resp.StatusCode == 200
		})
		return p, diag
	}
	agentProc, diag := startAgent()

	base := "http://" + scannerAddr + "/t/" + tunnelID + "/bitbucket"
	dst := filepath.Join(t.TempDir(), "app")
	gitCmd(t, "", scannerToken, "clone", "-q", base+"/scm/proj/app.git", dst)
	if n := gitCmd(t, dst, scannerToken, "rev-list", "--count", "HEAD"); n != "5" {
		t.Fatalf("clone has %s commits", n)
	}

	// ferry-agent status reads the running agent.
	out, err := exec.Command(agentBin, "status", "--addr", diag).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "CONNECTED, 2 of 2") || !strings.Contains(string(out), "allowed") {
		t.Fatalf("status: %v\n%s", err, out)
	}

	// kill -9 the agent: the relay answers 503 tunnel_offline, fast.
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	get := func() (int, string) {
		req, _ := http.NewRequest("GET", base+"/rest/api/1.0/projects", nil)
		req.Header.Set("Authorization", "Bearer "+scannerToken)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	killed := time.Now()
	agentProc.cmd.Process.Signal(syscall.SIGKILL)
	<-agentProc.done
	waitFor(t, "503 after kill -9", func() bool { s, _ := get(); return s == 503 })
	t.Logf("relay answered 503 %v after the agent was killed", time.Since(killed).Round(time.Millisecond))
	status, body := get()
	if status != 503 || errorBody(t, body).Error != httperr.TunnelOffline {
		t.Fatalf("after kill: %d %s", status, body)
	}

	// A restarted agent serves again; SIGTERM then drains and exits 0.
	agentProc, _ = startAgent()
	if status, body := get(); status != 200 {
		t.Fatalf("after agent restart: %d %s", status, body)
	}
	if code := agentProc.signal(syscall.SIGTERM); code != 0 {
		t.Fatalf("agent exit code after SIGTERM: %d", code)
	}
	agentProc.waitLog("agent stopped")
	if code := relayProc.signal(syscall.SIGTERM); code != 0 {
		t.Fatalf("relay exit code after SIGTERM: %d", code)
	}
	relayProc.waitLog("relay stopped")
}

func TestBinariesBadConfigExit2(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	fifo := filepath.Join(w.dir, "pat.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	pat := filepath.Join(w.dir, "pat")
	cases := []struct {
		bin, file, body string
		want            []string
	}{
		{relayBin, "relay.yaml", strings.Replace(w.relayYAML(":0"), "scanner_listen", "scanner_lisen", 1), []string{"relay.yaml:3", "scanner_lisen", "unknown field"}},
		{agentBin, "agent.yaml", strings.Replace(w.agentYAML("127.0.0.1:1", ""), filepath.Join(w.dir, "pat"), "/nonexistent/pat", 1), []string{"agent.yaml", "upstreams[0].auth.token_file", "no such file"}},
		{relayBin, "missing.yaml", "", []string{"missing.yaml", "cannot read"}},
		// Paths pointed at the wrong thing fail at once instead of
		// filling the memory (/dev/zero) or hanging (a pipe).
		{agentBin, "zero.yaml", strings.Replace(w.agentYAML("127.0.0.1:1", ""), pat, "/dev/zero", 1), []string{"zero.yaml", "upstreams[0].auth.token_file", "/dev/zero", "is a character device, not a regular file"}},
		{agentBin, "fifo.yaml", strings.Replace(w.agentYAML("127.0.0.1:1", ""), pat, fifo, 1), []string{"fifo.yaml", "upstreams[0].auth.token_file", "is a named pipe, not a regular file"}},
		{relayBin, "/dev/zero", "", []string{"/dev/zero", "cannot read", "more than 16 MiB"}},
	}
	for _, c := range cases {
		path := filepath.Join(w.dir, c.file)
		if filepath.IsAbs(c.file) {
			path = c.file
		}
		if c.body != "" {
			path = w.write(c.file, c.body)
		}
		cmd := exec.Command(c.bin, "--config", path)
		out, err := cmd.CombinedOutput()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 2 {
			t.Errorf("%s: want exit 2, got %v\n%s", c.file, err, out)
			continue
		}
		msg := strings.TrimSpace(string(out))
		if strings.Count(msg, "\n") != 0 {
			t.Errorf("%s: want one line, got:\n%s", c.file, msg)
		}
		for _, want := range c.want {
			if !strings.Contains(msg, want) {
				t.Errorf("%s: %q does not mention %q", c.file, msg, want)
			}
		}
	}
	if err := exec.Command(relayBin, "--config").Run(); err == nil {
		t.Error("missing --config value accepted")
	}
}

func TestRelayTokenCommand(t *testing.T) {
	relayBin, agentBin := binaries(t)
	out, err := exec.Command(relayBin, "token").Output()
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != 2 {
		t.Fatalf("want two lines, got %q", out)
	}
	sum := sha256.Sum256([]byte(lines[0]))
	if lines[1] != "sha256:"+hex.EncodeToString(sum[:]) {
		t.Fatalf("second line %q is not the sha256 of the first", lines[1])
	}
	for _, bin := range []string{relayBin, agentBin} {
		if out, err := exec.Command(bin, "version").Output(); err != nil || !strings.HasPrefix(string(out), filepath.Base(bin)+" ") {
			t.Errorf("%s version: %q %v", bin, out, err)
		}
	}
}

// TestRelayCheckCommand: `ferry-relay check` validates a config as the
// relay would at start, without starting: exit 0 and a summary, exit 2
// and the one-line error for a bad file, exit 1 for an expired
// certificate.
func TestRelayCheckCommand(t *testing.T) {
	relayBin, _ := binaries(t)
	w := newWorld(t)
	good := w.write("relay.yaml", w.relayYAML(":0"))
	out, err := exec.Command(relayBin, "check", "--config", good).CombinedOutput()
	if err != nil || !strings.Contains(string(out), good+": ok") || !strings.Contains(string(out), "2 tunnels, 2 scanners; registry memory") ||
		!strings.Contains(string(out), "agent certificate "+w.pki.CertFile+" valid until") {
		t.Fatalf("check of a good config: %v\n%s", err, out)
	}
	bad := w.write("bad.yaml", strings.Replace(w.relayYAML(":0"), "scanner_listen", "scanner_lisen", 1))
	out, err = exec.Command(relayBin, "check", "--config", bad).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 2 || !strings.Contains(string(out), "scanner_lisen") || strings.Count(strings.TrimSpace(string(out)), "\n") != 0 {
		t.Fatalf("check of a bad config: %v\n%s", err, out)
	}
	expired, err := testrig.NewPKIFor(t.TempDir(), -30*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	old := w.write("old.yaml", strings.NewReplacer(w.pki.CertFile, expired.CertFile, w.pki.KeyFile, expired.KeyFile).Replace(w.relayYAML(":0")))
	out, err = exec.Command(relayBin, "check", "--config", old).CombinedOutput()
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "EXPIRED") || !strings.Contains(string(out), "expired on") {
		t.Fatalf("check with an expired certificate: %v\n%s", err, out)
	}
}
