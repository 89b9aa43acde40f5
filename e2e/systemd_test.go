package e2e

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// notifySocket is a stand-in for systemd's end of sd_notify.
type notifySocket struct {
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []string
	done chan struct{}
}

func newNotifySocket(t *testing.T) *notifySocket {
	dir, err := os.MkdirTemp("", "sdn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	n := &notifySocket{path: filepath.Join(dir, "notify"), done: make(chan struct{})}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	n.conn = c
	go func() {
		defer close(n.done)
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.msgs = append(n.msgs, string(buf[:k]))
			n.mu.Unlock()
		}
	}()
	t.Cleanup(func() { c.Close(); <-n.done })
	return n
}

func (n *notifySocket) count(msg string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	c := 0
	for _, m := range n.msgs {
		if m == msg {
			c++
		}
	}
	return c
}

func (n *notifySocket) index(msg string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i, m := range n.msgs {
		if m == msg {
			return i
		}
	}
	return -1
}

func TestAgentSpeaksSdNotify(t *testing.T) {
	relayBin, agentBin := binaries(t)
	w := newWorld(t)
	relayProc := startProc(t, "relay", relayBin, "--config", w.write("relay.yaml", w.relayYAML("127.0.0.1:0")))
	addr := relayProc.waitLog("relay started")["agent_listen"].(string)
	ns := newNotifySocket(t)

	p := &proc{t: t, name: "agent", done: make(chan struct{})}
	p.cmd = exec.Command(agentBin, "--config", w.write("agent.yaml", w.agentYAML(addr, "")))
	p.cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+ns.path, "WATCHDOG_USEC=400000")
	p.cmd.Stderr = os.Stderr
	if !testing.Verbose() {
		p.cmd.Stderr = nil
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { p.cmd.Process.Kill(); <-p.done })

	waitFor(t, "READY=1", func() bool { return ns.count("READY=1") > 0 })
	waitFor(t, "watchdog pings", func() bool { return ns.count("WATCHDOG=1") >= 3 })
	waitFor(t, "status", func() bool { return ns.index("STATUS=2 of 2 relay connections up") >= 0 })
	p.cmd.Process.Signal(syscall.SIGHUP)
	waitFor(t, "RELOADING=1", func() bool { return ns.count("RELOADING=1") > 0 })
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(40 * time.Second):
		t.Fatal("agent did not stop")
	}
	// The datagram was sent before the exit, but the socket's reader may
	// not have taken it yet.
	deadline := time.Now().Add(5 * time.Second)
	for ns.count("STOPPING=1") == 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if ns.count("STOPPING=1") != 1 {
		ns.mu.Lock()
		t.Fatalf("not one STOPPING=1 in %q", strings.Join(ns.msgs, " | "))
	}
	relayProc.signal(syscall.SIGTERM)
}

func TestUnitFileSandboxScore(t *testing.T) {
	bin, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Fatal("systemd-analyze not installed")
	}
	out, err := exec.Command(bin, "security", "--offline=true", "--no-pager", "../systemd/ferry-agent.service").CombinedOutput()
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	i := strings.Index(string(out), "Overall exposure level for ferry-agent.service: ")
	if i < 0 {
		t.Fatalf("no score in:\n%s", out)
	}
	var score float64
	if _, err := fmt.Sscan(string(out[i+len("Overall exposure level for ferry-agent.service: "):]), &score); err != nil || score > 2.0 {
		t.Fatalf("exposure %v (%v), want ≤ 2.0", score, err)
	}
	t.Logf("systemd-analyze security exposure: %.1f", score)
}
