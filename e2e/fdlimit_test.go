package e2e

import (
	"net"
	"net/http"
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
