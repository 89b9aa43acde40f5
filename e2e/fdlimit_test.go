package e2e

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A relay out of file descriptors says so at error level (net/http's
// "Accept error", which went out at debug before), keeps running, and
// serves again once connections are given back. The real binary, under a
// real RLIMIT_NOFILE set by prlimit.
func TestRelayOutOfFileDescriptors(t *testing.T) {
	relayBin, _ := binaries(t)
	w := newWorld(t)
	cfg := w.write("relay.yaml", strings.Replace(w.relayYAML("127.0.0.1:0"), "log: {level: debug}", "log: {level: info}", 1))
	// Soft and hard limit both, or the Go runtime raises the soft one.
	relay := startProc(t, "relay", "prlimit", "--nofile=48:48", relayBin, "--config", cfg)
	scannerAddr := relay.waitLog("relay started")["scanner_listen"].(string)

	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	var accept map[string]any
	for i := 0; i < 200 && accept == nil; i++ {
		c, err := net.DialTimeout("tcp", scannerAddr, 2*time.Second)
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		held = append(held, c)
		accept = relay.findLog(func(m map[string]any) bool {
			msg, _ := m["msg"].(string)
			return strings.Contains(msg, "Accept error") && strings.Contains(msg, "too many open files")
		}, 20*time.Millisecond)
	}
	if accept == nil {
		t.Fatalf("the relay never said it could not accept, with %d connections held:\n%s", len(held), relay.rawLog())
	}
	if accept["level"] != "ERROR" {
		t.Fatalf("accept failure logged at %v, want ERROR: %v", accept["level"], accept)
	}

	for _, c := range held {
		c.Close()
	}
	held = nil
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	waitFor(t, "the relay answering once descriptors are free", func() bool {
		resp, err := client.Get("http://" + scannerAddr + "/t/" + tunnelID + "/bitbucket/rest/api/1.0/projects")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusUnauthorized
	})
	if code := relay.signal(syscall.SIGTERM); code != 0 {
		t.Fatalf("relay exit code after SIGTERM: %d", code)
	}
}

// An agent out of file descriptors tells the scanner that, not that
// Bitbucket cannot be reached, and logs it at error level; once its limit
// is raised it serves again. The real binary; its limit is lowered while
// it runs (prlimit --pid) to the lowest descriptor it has free.
func TestAgentOutOfFileDescriptors(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	relay := startProc(t, "relay", relayBin, "--config", w.write("relay.yaml", w.relayYAML("127.0.0.1:0")))
	started := relay.waitLog("relay started")
	agentAddr, scannerAddr := started["agent_listen"].(string), started["scanner_listen"].(string)
	// Every answer closes its connection, so each request dials anew.
	plain := w.serveUpstream(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Connection", "close")
		io.WriteString(rw, "ok")
	}))
	agent := startProc(t, "agent", agentBin, "--config", w.write("agent.yaml", w.agentYAML(agentAddr, w.upstreamYAML("plain", plain, ""))))
	diag := agent.waitLog("agent started")["diagnostics"].(string)
	waitFor(t, "agent ready", func() bool {
		resp, err := http.Get("http://" + diag + "/readyz")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})

	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{}}
	defer client.CloseIdleConnections()
	get := func() (int, string) {
		req, _ := http.NewRequest("GET", "http://"+scannerAddr+"/t/"+tunnelID+"/plain/rest/api/1.0/projects", nil)
		req.Header.Set("Authorization", "Bearer "+scannerToken)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if status, body := get(); status != 200 {
		t.Fatalf("before the limit: %d %s", status, body)
	}

	pid := agent.cmd.Process.Pid
	setLimit := func(n int) {
		t.Helper()
		if out, err := exec.Command("prlimit", "--pid", strconv.Itoa(pid), fmt.Sprintf("--nofile=%d:%d", n, n)).CombinedOutput(); err != nil {
			t.Skipf("cannot set the agent's limit (needs root): %v %s", err, out)
		}
	}
	// A descriptor the agent closes meanwhile (a finished dial) would let
	// the next request through: try a few times.
	var status int
	var body string
	for range 20 {
		setLimit(lowestFreeFD(t, pid))
		if status, body = get(); status != 200 {
			break
		}
	}
	if status != http.StatusBadGateway || !strings.Contains(errorBody(t, body).Message, "out of file descriptors") {
		t.Fatalf("agent out of descriptors answered %d %s; want 502 saying so", status, body)
	}
	line := agent.findLog(func(m map[string]any) bool {
		msg, _ := m["msg"].(string)
		return strings.Contains(msg, "out of file descriptors")
	}, 5*time.Second)
	if line == nil || line["level"] != "ERROR" || !strings.Contains(fmt.Sprint(line["err"]), "too many open files") {
		t.Fatalf("agent log line %v; want an ERROR naming the cause", line)
	}

	setLimit(65536)
	if status, body := get(); status != 200 {
		t.Fatalf("after the limit was raised: %d %s", status, body)
	}
}

// lowestFreeFD is the lowest descriptor number pid has not open: a limit
// of that makes its next open fail.
func lowestFreeFD(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	open := map[int]bool{}
	for _, e := range ents {
		if n, err := strconv.Atoi(e.Name()); err == nil {
			open[n] = true
		}
	}
	n := 0
	for open[n] {
		n++
	}
	return n
}
