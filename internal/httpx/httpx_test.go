package httpx

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"testing"
	"time"
)

func TestHostPortDefaultsByScheme(t *testing.T) {
	for in, want := range map[string]string{
		"https://bitbucket.corp":      "bitbucket.corp:443",
		"http://bitbucket.corp/bb":    "bitbucket.corp:80",
		"wss://relay.example.com/v1":  "relay.example.com:443",
		"ws://127.0.0.1":              "127.0.0.1:80",
		"http://proxy.corp:3128":      "proxy.corp:3128",
		"https://[::1]/":              "[::1]:443",
		"http://[fe80::1]:8080/x?q=1": "[fe80::1]:8080",
	} {
		u, err := url.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := HostPort(u); got != want {
			t.Errorf("HostPort(%s) = %s, want %s", in, got, want)
		}
	}
}

// sentBeforeReturn runs handle in a real server's handler, which then
// waits for the client to have read the whole response before it
// returns (up to wait). It reports whether the client had it by then,
// and the response the client got.
func sentBeforeReturn(t *testing.T, wait time.Duration, handle func(w http.ResponseWriter)) (bool, *http.Response, string) {
	t.Helper()
	read := make(chan struct{})
	early := make(chan bool, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		handle(w)
		select {
		case <-read:
			early <- true
		case <-time.After(wait):
			early <- false
		}
	}))
	defer srv.Close()
	resp, err := srv.Client().Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body) // cut short where the handler wrote less than it declared
	resp.Body.Close()
	close(read)
	return <-early, resp, string(body)
}

func TestCompleteResponseLeavesBeforeHandlerReturns(t *testing.T) {
	for _, tc := range []struct {
		name   string
		handle func(r *Recorder)
		status int
		body   string
	}{
		{"declared length", func(r *Recorder) {
			r.Header().Set("Content-Length", "5")
			r.Write([]byte("hello"))
		}, 200, "hello"},
		{"declared length, written in pieces", func(r *Recorder) {
			r.Header().Set("Content-Length", "11")
			r.WriteHeader(http.StatusCreated)
			r.Write([]byte("hello "))
			r.Write([]byte("world"))
		}, 201, "hello world"},
		{"no content", func(r *Recorder) { r.WriteHeader(http.StatusNoContent) }, 204, ""},
		{"not modified", func(r *Recorder) { r.WriteHeader(http.StatusNotModified) }, 304, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			early, resp, body := sentBeforeReturn(t, 10*time.Second, func(w http.ResponseWriter) {
				rec := &Recorder{ResponseWriter: w}
				tc.handle(rec)
				rec.SendIfComplete()
			})
			if !early {
				t.Error("the client got the response only after the handler returned")
			}
			if resp.StatusCode != tc.status || body != tc.body {
				t.Errorf("got %d %q, want %d %q", resp.StatusCode, body, tc.status, tc.body)
			}
		})
	}
}

// A response whose length the handler did not declare is left to the
// server, which gives it a Content-Length when the handler returns:
// sending it early would have chunked it.
func TestResponseOfUndeclaredLengthKeepsItsFraming(t *testing.T) {
	for _, tc := range []struct {
		name   string
		handle func(r *Recorder)
	}{
		{"undeclared", func(r *Recorder) { r.Write([]byte("hello")) }},
		{"declared, not all written", func(r *Recorder) {
			r.Header().Set("Content-Length", "5")
			r.Write([]byte("hel"))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			early, resp, _ := sentBeforeReturn(t, 300*time.Millisecond, func(w http.ResponseWriter) {
				rec := &Recorder{ResponseWriter: w}
				tc.handle(rec)
				rec.SendIfComplete()
			})
			if early {
				t.Error("sent before the handler returned")
			}
			if tc.name == "undeclared" && (resp.ContentLength != 5 || len(resp.TransferEncoding) > 0) {
				t.Errorf("Content-Length %d, Transfer-Encoding %v; want 5 and none", resp.ContentLength, resp.TransferEncoding)
			}
		})
	}
}

func TestRecorderStatusIsTheFinalOne(t *testing.T) {
	_, resp, _ := sentBeforeReturn(t, 0, func(w http.ResponseWriter) {
		rec := &Recorder{ResponseWriter: w}
		rec.Header().Set("Link", "</style.css>; rel=preload")
		rec.WriteHeader(http.StatusEarlyHints)
		rec.WriteHeader(http.StatusAccepted)
		if rec.StatusCode() != http.StatusAccepted {
			t.Errorf("StatusCode %d after 103 then 202, want 202", rec.StatusCode())
		}
	})
	if resp.StatusCode != http.StatusAccepted {
		t.Errorf("client got %d", resp.StatusCode)
	}
	rec := &Recorder{ResponseWriter: httptest.NewRecorder()}
	if rec.StatusCode() != 499 {
		t.Errorf("nothing sent: StatusCode %d, want 499", rec.StatusCode())
	}
}
