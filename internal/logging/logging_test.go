package logging

import (
	"crypto/tls"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// lines are the JSON log lines written to buf so far.
func lines(buf *testrig.LogBuffer) []map[string]any {
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(buf.String()), "\n") {
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
	var buf testrig.LogBuffer
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
		got := lines(&buf)
		var panicLine map[string]any
		for _, m := range got {
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
			t.Fatalf("no panic line in the log: %v", got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
