package e2e

import (
	"bytes"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/httperr"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// heldLog is a log destination that holds back a request's line (the
// relay's "scanner request", the agent's "request") whose path contains
// the marker, until released: a journald under load, or a pipe nobody
// reads for a while.
type heldLog struct {
	testrig.LogBuffer
	mu      sync.Mutex
	marker  string
	release chan struct{}
}

func (l *heldLog) Write(p []byte) (int, error) {
	l.mu.Lock()
	marker, release := l.marker, l.release
	l.mu.Unlock()
	isRequestLine := bytes.Contains(p, []byte(`"msg":"scanner request"`)) || bytes.Contains(p, []byte(`"msg":"request"`))
	if marker != "" && isRequestLine && bytes.Contains(p, []byte(marker)) {
		<-release
	}
	return l.LogBuffer.Write(p)
}

// hold starts holding lines about marker; the func returned lets them
// through.
func (l *heldLog) hold(marker string) (let func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.marker, l.release = marker, make(chan struct{})
	release := l.release
	var once sync.Once
	return func() { once.Do(func() { close(release) }) }
}

// TestAnswersDoNotWaitForLogLines: the scanner has a request's answer
// before the relay and the agent write its log lines (and the agent its
// audit line). Before, net/http sent a small answer only when the handler
// returned, after those lines: a slow log destination held up every
// request, and each line's write was on the request's path. Once let
// through, the lines are all there.
func TestAnswersDoNotWaitForLogLines(t *testing.T) {
	w := newWorld(t)
	relayLog, agentLog := &heldLog{}, &heldLog{}
	r, rrun := w.startRelayLogged(w.relayYAML("127.0.0.1:0"), relayLog)
	defer rrun.shutdown(t)
	a, arun := w.startAgentLogged(w.agentYAML(r.AgentAddr(), ""), agentLog)
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	waitCredentialCheck(t, a)
	base := "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket"
	client := &http.Client{Transport: &http.Transport{}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()

	for _, tc := range []struct {
		name, method, path, token string
		status                    int
		reachesAgent              bool
	}{
		{"allowed", "GET", "/rest/api/1.0/projects/PROJ/repos", scannerToken, http.StatusOK, true},
		{"refused by the agent", "DELETE", "/rest/api/1.0/projects/PROJ/repos/app", scannerToken, http.StatusForbidden, true},
		{"refused by the relay", "GET", "/rest/api/1.0/projects/OPS/repos", "fry_not-a-token", http.StatusUnauthorized, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			letRelay, letAgent := relayLog.hold(tc.path), agentLog.hold(tc.path)
			defer letRelay()
			defer letAgent()
			req, _ := http.NewRequest(tc.method, base+tc.path, nil)
			req.Header.Set("Authorization", "Bearer "+tc.token)
			resp, err := client.Do(req)
			if err != nil {
				t.Fatalf("with the log lines held back: %v", err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != tc.status {
				t.Fatalf("with the log lines held back: %d %q %v, want %d", resp.StatusCode, body, err, tc.status)
			}
			rid := resp.Header.Get(httperr.RequestIDHeader)
			letRelay()
			letAgent()
			waitFor(t, "the relay's line", func() bool { return hasLine(relayLog.String(), "scanner request", rid, tc.path) })
			if tc.reachesAgent {
				waitFor(t, "the agent's line", func() bool { return hasLine(agentLog.String(), "request", rid, tc.path) })
			}
		})
	}
}

// hasLine reports whether log has a line with message msg about request
// rid and path.
func hasLine(log, msg, rid, path string) bool {
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `"msg":"`+msg+`"`) && strings.Contains(l, `"request_id":"`+rid+`"`) && strings.Contains(l, path) {
			return true
		}
	}
	return false
}
