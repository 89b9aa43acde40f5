package logging

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ferry-tunnel/ferry/internal/config"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) lines() []map[string]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(s.b.String()), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(l), &m) == nil {
			out = append(out, m)
		}
	}
	return out
}

// What net/http reports about one peer stays at debug; a handler's panic
// reaches an info-level log, at error.
func TestServerErrorLogLevels(t *testing.T) {
	var buf syncBuffer
	log := New(&buf, config.Log{Level: "info"})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/panic" {
			panic("handler bug")
		}
	}))
	srv.Config.ErrorLog = ServerErrorLog(log)
	srv.StartTLS()
	defer srv.Close()

	// A plain-text client on the TLS port: a handshake error, at debug.
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	c.Read(make([]byte, 512))
	c.Close()

	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	defer client.CloseIdleConnections()
	if _, err := client.Get(srv.URL + "/panic"); err == nil {
		t.Fatal("a panicking handler's request succeeded")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		lines := buf.lines()
		var panicLine map[string]any
		for _, m := range lines {
			msg, _ := m["msg"].(string)
			if strings.Contains(msg, "TLS handshake error") {
				t.Fatalf("a peer's handshake error reached the info log: %v", m)
			}
			if strings.HasPrefix(msg, "http: panic serving") {
				panicLine = m
			}
		}
		if panicLine != nil {
			if panicLine["level"] != "ERROR" || !strings.Contains(panicLine["msg"].(string), "handler bug") {
				t.Fatalf("panic logged as %v", panicLine)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no panic line in the log: %v", lines)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
