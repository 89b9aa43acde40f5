package relay

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/proto"
)

// tunnelTransport is the relay proxy's http.RoundTripper: a yamux stream
// per request on the agent connection the handler picked, kept for the
// next request where the agent serves keep-alive streams (relay/pool.go).
// A new stream's header and the request's head leave in one write, and
// the response is read in the caller's goroutine. (http.Transport, dialling a
// stream per request, ran a dial, a read loop and a write loop goroutine
// for each one: three goroutines and as many scheduler hand-offs on every
// small request, and the head sent apart from the stream header.)
//
// What http.Transport did that matters here is kept: a bound on the wait
// for the response head and on its size, 100-continue (a body the agent
// refuses is never asked of the scanner), trailers and chunking (via
// Request.Write and http.ReadResponse), and the stream cut when the
// scanner goes away.
//
// Request bodies stream from goroutines counted in the Relay's
// bodyWriters, which Serve waits for at shutdown: a body may still be
// streaming after the response came (an agent that answers early).
type tunnelTransport struct{ r *Relay }

const (
	maxResponseHead = 64 << 10
	// max1xx bounds the informational responses skipped before the final
	// one.
	max1xx = 8
	// continueWait is how long a request with "Expect: 100-continue"
	// waits for the agent's 100 before sending its body anyway (an agent
	// behind an old relay, or a server that ignores Expect).
	continueWait = time.Second
)

func (t tunnelTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	body := req.Body
	if body == http.NoBody {
		body = nil
	}
	rt := routeFrom(req.Context())
	if rt == nil {
		closeBody(body)
		return nil, errors.New("relay: request without a route")
	}
	// An idle keep-alive stream may be dead by the time it is used (its
	// agent went away): a request that can be sent again safely gets a
	// fresh stream then. Others always get a fresh stream.
	replayable := body == nil && idempotent(req.Method)
	if replayable {
		if s := t.r.pooledStream(rt); s != nil {
			resp, err := t.exchange(req, rt, s, nil, true)
			if !errors.Is(err, errStaleStream) {
				return resp, err
			}
			t.r.log.Debug("kept stream to the agent was closed; sending the request on a new one", "request_id", rt.header.RequestID, "err", err)
		}
	}
	s, err := t.r.openStream(rt)
	if err != nil {
		closeBody(body)
		return nil, err
	}
	return t.exchange(req, rt, s, body, false)
}

// errStaleStream: a pooled stream ended before any of the response came.
var errStaleStream = errors.New("keep-alive stream closed before the response")

// idempotent reports whether a request of this method may be sent twice
// (RFC 9110, 9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

// exchange sends req on s and reads the response head. pooled: s carried
// requests before, and an error before any response byte is errStaleStream.
func (t tunnelTransport) exchange(req *http.Request, rt *route, s *trackedStream, body io.ReadCloser, pooled bool) (*http.Response, error) {
	keepAlive := s.conn.keepAlive
	// The scanner going away ends the request: the agent sees its stream
	// close and cancels the upstream request.
	stopCut := context.AfterFunc(req.Context(), func() { s.Close() })
	fail := func(err error) (*http.Response, error) {
		stopCut()
		s.Close()
		return nil, err
	}

	out := *req // RoundTrip must not change the caller's request
	// A plain stream carries one request, and the agent closes it after
	// the response; a keep-alive stream waits for the next.
	out.Close = !keepAlive
	expect := body != nil && strings.EqualFold(strings.TrimSpace(req.Header.Get("Expect")), "100-continue")
	var gate *continueGate
	if expect {
		gate = newContinueGate(body)
		out.Body = gate
	}

	bw, _ := t.r.heads.Get().(*bufio.Writer)
	if bw == nil {
		bw = bufio.NewWriterSize(nil, 4<<10)
	}
	bw.Reset(s)
	if !pooled {
		h := rt.header
		if keepAlive {
			// Each request names itself in proto.StreamHeaderField.
			h = proto.Header{Kind: proto.KindHTTPKeepAlive}
		}
		if err := proto.WriteHeader(bw, h); err != nil {
			bw.Reset(nil)
			t.r.heads.Put(bw)
			closeBody(body)
			return fail(err)
		}
	}
	if body == nil {
		// A request head fits the new stream's window: the write waits
		// only if the session is stuck.
		s.SetWriteDeadline(time.Now().Add(streamHeaderWrite))
		err := out.Write(bw)
		if err == nil {
			err = bw.Flush()
		}
		s.SetWriteDeadline(time.Time{})
		bw.Reset(nil)
		t.r.heads.Put(bw)
		if err != nil {
			if pooled && req.Context().Err() == nil {
				err = fmt.Errorf("%w: %v", errStaleStream, err)
			}
			return fail(fmt.Errorf("send request: %w", err))
		}
	} else {
		// The body streams from its own goroutine, so that a response
		// the agent sends before reading all of it (a refusal) is seen.
		// Request.Write flushes the head before the body.
		t.r.bodyWriters.Add(1)
		go func() {
			defer t.r.bodyWriters.Done()
			err := out.Write(bw)
			if err == nil {
				err = bw.Flush()
			}
			bw.Reset(nil)
			t.r.heads.Put(bw)
			closeBody(body)
			// A body that could not be read whole must not look complete
			// to the agent; after a refusal the stream carries the
			// response still. (Request.Write hides the gate's error in
			// an unexported type, so the gate is asked.)
			if err != nil && !gate.refused() {
				s.Close()
			}
		}()
	}

	// The response head: bounded in time (timeouts.agent_response, as
	// the agent has its own upstream timeout below it) and in size.
	s.setIdle(t.r.tmo().AgentResponse)
	head := &httpx.HeadLimit{R: s}
	head.Reset(maxResponseHead)
	br, _ := t.r.replies.Get().(*bufio.Reader)
	if br == nil {
		br = bufio.NewReaderSize(nil, 4<<10)
	}
	br.Reset(head)
	var resp *http.Response
	var err error
	for n := 0; ; n++ {
		resp, err = http.ReadResponse(br, &out)
		if err != nil {
			if gate != nil {
				gate.decide(false)
			}
			if errors.Is(err, httpx.ErrHeadTooLarge) {
				return fail(fmt.Errorf("agent response head larger than %d bytes", maxResponseHead))
			}
			if pooled && head.N == 0 && req.Context().Err() == nil && !httpx.IsTimeout(err) {
				err = fmt.Errorf("%w: %v", errStaleStream, err)
			}
			return fail(fmt.Errorf("read agent response: %w", err))
		}
		if resp.StatusCode == http.StatusSwitchingProtocols {
			// The relay never asks for an upgrade.
			return fail(errors.New("agent switched protocols unasked"))
		}
		if resp.StatusCode >= 200 {
			break
		}
		if resp.StatusCode == http.StatusContinue && gate != nil {
			gate.decide(true)
		}
		if n >= max1xx {
			return fail(fmt.Errorf("agent sent more than %d informational responses", max1xx))
		}
	}
	if gate != nil {
		// A final answer before 100 Continue: the body is not wanted.
		gate.decide(false)
	}
	head.Lift()
	s.setIdle(t.r.streamIdle())
	sb := &streamBody{ReadCloser: resp.Body, s: s, stopCut: stopCut, release: func() {
		br.Reset(nil)
		t.r.replies.Put(br)
	}}
	// A keep-alive stream serves the next request once this response was
	// read whole, if nothing else is still on its way into it (a request
	// body) and the agent did not say it closes.
	if keepAlive && body == nil && !resp.Close {
		sb.keep = func() bool {
			s.end()
			return s.conn.pool.put(s)
		}
	}
	resp.Body = sb
	return resp, nil
}

// streamBody is a response body read from its stream. Close closes the
// stream rather than the body: http's Close of a response body reads it to
// the end, which for a clone the scanner abandoned is gigabytes.
//
// The body reads through a pooled bufio.Reader, which release gives back
// at Close if the body was read to its end: http's body never reads its
// source again once it returned io.EOF, so no later Read can reach the
// reader's next user. A body closed part-read (or while a Read is under
// way) leaves its reader to the GC.
type streamBody struct {
	io.ReadCloser
	s       io.Closer
	stopCut func() bool
	once    sync.Once
	release func()
	// keep, when set, offers the stream for another request; false: the
	// stream is closed.
	keep  func() bool
	ended atomic.Bool // a Read returned io.EOF
}

func (b *streamBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err == io.EOF {
		b.ended.Store(true)
	}
	return n, err
}

func (b *streamBody) Close() error {
	b.once.Do(func() {
		// false: the scanner left and the cut is closing the stream.
		live := b.stopCut()
		if b.ended.Load() {
			b.release()
			if live && b.keep != nil && b.keep() {
				return
			}
		}
		b.s.Close()
	})
	return nil
}

// errNotSent: the agent answered before asking for the body.
var errNotSent = errors.New("request body not sent: the agent answered first")

// refused reports whether the agent answered before asking for the body
// (false for a nil gate: no 100-continue).
func (g *continueGate) refused() bool {
	if g == nil {
		return false
	}
	select {
	case <-g.decided:
		return !g.send
	default:
		return false
	}
}

// continueGate holds a request body back until the agent answers
// "100 Continue", or until continueWait passes without an answer.
type continueGate struct {
	body    io.ReadCloser
	decided chan struct{}
	once    sync.Once
	send    bool
}

func newContinueGate(body io.ReadCloser) *continueGate {
	return &continueGate{body: body, decided: make(chan struct{})}
}

func (g *continueGate) decide(send bool) {
	g.once.Do(func() {
		g.send = send
		close(g.decided)
	})
}

func (g *continueGate) Read(p []byte) (int, error) {
	select {
	case <-g.decided:
	default:
		timer := time.NewTimer(continueWait)
		select {
		case <-g.decided:
		case <-timer.C:
			g.decide(true)
		}
		timer.Stop()
	}
	if !g.send {
		return 0, errNotSent
	}
	return g.body.Read(p)
}

func (g *continueGate) Close() error { return g.body.Close() }

func closeBody(b io.ReadCloser) {
	if b != nil {
		b.Close()
	}
}
