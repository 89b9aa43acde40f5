package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"

	"github.com/ferry-tunnel/ferry/internal/testrig"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// The reference tunnels are only a scale if they carry what they are
// given: every kind forwards a request head, a request body and a
// response body both ways, byte for byte, over keep-alive connections,
// and stops without leaving a goroutine behind.
func TestReferenceTunnelsCarryRequestsBothWays(t *testing.T) {
	pki, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	upstream := &http.Server{TLSConfig: pki.ServerTLS(), Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := sha256.New()
		n, _ := io.Copy(h, r.Body)
		fmt.Fprintf(w, "%s %s %q %d %s\n", r.Method, r.URL.RequestURI(), r.Header.Get("X-Probe"), n, hex.EncodeToString(h.Sum(nil)))
		w.Write([]byte(strings.Repeat("r", 1<<20)))
	})}
	served := make(chan error, 1)
	go func() { served <- upstream.ServeTLS(ln, "", "") }()
	defer func() {
		upstream.Close()
		<-served
	}()

	body := strings.Repeat("b", 300<<10)
	sum := sha256.Sum256([]byte(body))
	for _, k := range referenceKinds() {
		t.Run(k.name, func(t *testing.T) {
			exit, err := newReferenceEnd(k.name+"-exit", ln.Addr().String(), pki.Cert, pki.Pool)
			if err != nil {
				t.Fatal(err)
			}
			exitDone := make(chan error, 1)
			go func() { exitDone <- exit.serve() }()
			entry, err := newReferenceEnd(k.name+"-entry", exit.ln.Addr().String(), pki.Cert, pki.Pool)
			if err != nil {
				exit.close()
				<-exitDone
				t.Fatal(err)
			}
			entryDone := make(chan error, 1)
			go func() { entryDone <- entry.serve() }()
			client := &http.Client{Transport: &http.Transport{}}
			defer func() {
				client.CloseIdleConnections()
				entry.close()
				if err := <-entryDone; err != nil {
					t.Errorf("entry: %v", err)
				}
				exit.close()
				if err := <-exitDone; err != nil {
					t.Errorf("exit: %v", err)
				}
			}()

			// Three requests: the later ones on the kept connection.
			for i := 0; i < 3; i++ {
				req, _ := http.NewRequest("POST", fmt.Sprintf("http://%s/bench/echo?i=%d", entry.ln.Addr(), i), strings.NewReader(body))
				req.Header.Set("X-Probe", "probe")
				resp, err := client.Do(req)
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				got, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					t.Fatalf("request %d: read the response: %v", i, err)
				}
				head, rest, _ := strings.Cut(string(got), "\n")
				want := fmt.Sprintf("POST /bench/echo?i=%d \"probe\" %d %s", i, len(body), hex.EncodeToString(sum[:]))
				if resp.StatusCode != 200 || head != want {
					t.Fatalf("request %d: status %d, upstream saw %q, want %q", i, resp.StatusCode, head, want)
				}
				if rest != strings.Repeat("r", 1<<20) {
					t.Fatalf("request %d: response body of %d bytes is not the upstream's", i, len(rest))
				}
			}
		})
	}
}

func TestUnknownReferenceRoleIsRefused(t *testing.T) {
	pki, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newReferenceEnd("tunnel-entry", "127.0.0.1:1", pki.Cert, pki.Pool); err == nil || !strings.Contains(err.Error(), `unknown reference tunnel role "tunnel-entry"`) {
		t.Fatalf("err = %v", err)
	}
}
