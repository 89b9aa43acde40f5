package relay

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/proto"
)

// answerOne accepts one request stream on an agent session, reads the
// request head and hands it, with the stream, to answer.
func answerOne(t *testing.T, sess *yamux.Session, answer func(s *yamux.Stream, br *bufio.Reader, req *http.Request)) chan struct{} {
	done := make(chan struct{})
	go func() {
		defer close(done)
		s, err := sess.AcceptStream()
		if err != nil {
			t.Error(err)
			return
		}
		defer s.Close()
		if _, err := proto.ReadHeader(s); err != nil {
			t.Error(err)
			return
		}
		br := bufio.NewReader(s)
		req, err := http.ReadRequest(br)
		if err != nil {
			t.Error(err)
			return
		}
		answer(s, br, req)
	}()
	return done
}

// waitAnswered waits for answerOne's agent to be done with its request:
// a request answered without reaching the agent fails here, not by
// hanging the test.
func waitAnswered(t *testing.T, done chan struct{}) {
	t.Helper()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the request never reached the agent")
	}
}

func scannerDo(t *testing.T, r *Relay, method string, body io.Reader, hdr map[string]string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, "http://"+r.ScannerAddr()+"/t/t/bitbucket/rest/api/1.0/projects", body)
	req.Header.Set("Authorization", "Bearer scanner-token")
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	client := &http.Client{Transport: &http.Transport{ExpectContinueTimeout: 10 * time.Second}}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// An agent whose response head never ends, that sends informational
// responses without end, or that switches protocols unasked, gets a 502,
// not a relay that reads forever.
func TestRelayBoundsAgentResponseHead(t *testing.T) {
	r := startPlainRelay(t, "15s")
	sess, _ := fakeAgent(t, r, 0, 0)
	for name, head := range map[string]string{
		"huge header":     "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("a", 80<<10) + "\r\n\r\n",
		"endless 1xx":     strings.Repeat("HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n", 50) + "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
		"not HTTP at all": "SSH-2.0-OpenSSH_9.6\r\n",
		"upgrade unasked": "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
	} {
		done := answerOne(t, sess, func(s *yamux.Stream, _ *bufio.Reader, _ *http.Request) {
			io.WriteString(s, head)
		})
		status, body := scannerDo(t, r, "GET", nil, nil)
		waitAnswered(t, done)
		if status != http.StatusBadGateway || !strings.Contains(body, "upstream_error") {
			t.Errorf("%s: scanner got %d %s; want 502 upstream_error", name, status, body)
		}
	}
	// Informational responses within bounds are skipped.
	done := answerOne(t, sess, func(s *yamux.Stream, _ *bufio.Reader, _ *http.Request) {
		io.WriteString(s, "HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
	})
	status, body := scannerDo(t, r, "GET", nil, nil)
	waitAnswered(t, done)
	if status != 200 || body != "ok" {
		t.Fatalf("after one 103: %d %q", status, body)
	}
}

// With "Expect: 100-continue", a body the agent refuses before asking for
// it is never sent by the scanner; one it asks for arrives whole.
func TestRelayKeepsExpectContinue(t *testing.T) {
	r := startPlainRelay(t, "15s")
	sess, _ := fakeAgent(t, r, 0, 0)
	expect := map[string]string{"Expect": "100-continue"}

	var got atomic.Int64
	done := answerOne(t, sess, func(s *yamux.Stream, br *bufio.Reader, req *http.Request) {
		if req.Header.Get("Expect") != "100-continue" {
			t.Errorf("agent got Expect %q", req.Header.Get("Expect"))
		}
		io.WriteString(s, "HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nConnection: close\r\n\r\ndenied")
		// Whatever arrives before the relay closes the stream.
		n, _ := io.Copy(io.Discard, br)
		got.Store(n)
	})
	refused := &testrig.ReadCounter{R: strings.NewReader(strings.Repeat("x", 1<<20))}
	status, body := scannerDo(t, r, "POST", refused, expect)
	waitAnswered(t, done)
	if status != 403 || body != "denied" {
		t.Fatalf("refused upload: %d %q", status, body)
	}
	if n := refused.Reads(); n != 0 || got.Load() != 0 {
		t.Fatalf("a refused body was read %d times by the scanner's client and %d bytes reached the agent", n, got.Load())
	}

	done = answerOne(t, sess, func(s *yamux.Stream, br *bufio.Reader, req *http.Request) {
		io.WriteString(s, "HTTP/1.1 100 Continue\r\n\r\n")
		n, err := io.Copy(io.Discard, req.Body)
		fmt.Fprintf(s, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%d", len(fmt.Sprint(n)), n)
		if err != nil {
			t.Error(err)
		}
	})
	status, body = scannerDo(t, r, "POST", strings.NewReader(strings.Repeat("y", 3<<20)), expect)
	waitAnswered(t, done)
	if status != 200 || body != fmt.Sprint(3<<20) {
		t.Fatalf("accepted upload: %d %q", status, body)
	}
}

// Response readers are pooled: under concurrent requests, some bodies read
// whole and some abandoned part-read, every body read whole is intact.
func TestRelayResponsesIntactWithReaderReuse(t *testing.T) {
	r := startPlainRelay(t, "15s")
	sess, _ := fakeAgent(t, r, 0, 0)
	const scanners, each = 6, 15
	var wg sync.WaitGroup
	for range scanners * each {
		wg.Add(1)
		done := answerOne(t, sess, func(s *yamux.Stream, _ *bufio.Reader, req *http.Request) {
			// Each body is its request's id over and over, some chunked.
			id := req.URL.Query().Get("id")
			body := strings.Repeat(id+";", 20000)
			if strings.HasSuffix(id, "0") {
				fmt.Fprintf(s, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(body), body)
				return
			}
			fmt.Fprintf(s, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(body), body)
		})
		go func() {
			defer wg.Done()
			<-done
		}()
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: scanners}}
	defer client.CloseIdleConnections()
	errs := make(chan error, scanners*each)
	var scans sync.WaitGroup
	for i := range scanners {
		scans.Add(1)
		go func() {
			defer scans.Done()
			for j := range each {
				id := fmt.Sprintf("%d-%d", i, j)
				req, _ := http.NewRequest("GET", "http://"+r.ScannerAddr()+"/t/t/bitbucket/rest/api/1.0/projects?id="+id, nil)
				req.Header.Set("Authorization", "Bearer scanner-token")
				resp, err := client.Do(req)
				if err != nil {
					errs <- err
					continue
				}
				if j%3 == 1 { // abandoned part-read
					io.ReadFull(resp.Body, make([]byte, 100))
					resp.Body.Close()
					continue
				}
				b, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if want := strings.Repeat(id+";", 20000); err != nil || string(b) != want {
					errs <- fmt.Errorf("request %s: %d bytes (%v), want %d of its own", id, len(b), err, len(want))
				}
			}
		}()
	}
	scans.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	wg.Wait()
}

// A body closed before its end does not give its reader back: a Read
// still under way, or a later one, would read into the next user's. One
// read to its end does.
func TestStreamBodyReleasesOnlyEndedBodies(t *testing.T) {
	for _, c := range []struct {
		read    int
		release bool
	}{{read: 1}, {read: 3}, {read: 4, release: true}} {
		released, closed := false, false
		b := &streamBody{ReadCloser: io.NopCloser(strings.NewReader("abc")), s: closerFunc(func() { closed = true }),
			stopCut: func() bool { return true }, release: func() { released = true }}
		b.Read(make([]byte, c.read)) // "abc" in one read; EOF on the next
		if c.read == 4 {
			b.Read(make([]byte, 1))
		}
		b.Close()
		b.Close()
		if released != c.release || !closed {
			t.Errorf("read %d: released %v, stream closed %v; want released %v", c.read, released, closed, c.release)
		}
	}
}

type closerFunc func()

func (f closerFunc) Close() error { f(); return nil }
