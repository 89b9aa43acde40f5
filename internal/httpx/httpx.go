// Package httpx holds small net/http helpers both daemons use.
package httpx

import (
	"compress/gzip"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
)

// Recorder notes the status and bytes of a response for access and audit
// logs. Unwrap keeps http.ResponseController (Flush) working through it.
type Recorder struct {
	http.ResponseWriter
	Status int
	Bytes  int64
}

// WriteHeader implements http.ResponseWriter. Informational answers
// (103 Early Hints, which ReverseProxy passes on) are not the status.
func (r *Recorder) WriteHeader(code int) {
	if r.Status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		r.Status = code
	}
	r.ResponseWriter.WriteHeader(code)
}

// Write implements http.ResponseWriter.
func (r *Recorder) Write(p []byte) (int, error) {
	if r.Status == 0 {
		r.Status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(p)
	r.Bytes += int64(n)
	return n, err
}

// StatusCode is the status sent, or 499 when nothing was: the client went
// away first.
func (r *Recorder) StatusCode() int {
	if r.Status == 0 {
		return 499
	}
	return r.Status
}

// Unwrap lets http.ResponseController reach the underlying writer.
func (r *Recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// SendIfComplete sends the response on its way at once if the handler has
// written all of it: its declared Content-Length reached, or a status
// without a body. The daemons call it before they write a request's log
// and audit lines, which otherwise go first: net/http sends a small
// response only when the handler returns. So a log destination that is
// slow (journald under load, a pipe nobody drains) never holds up an
// answer that is ready. (It does not make a request cheaper: the line is
// still formatted and written, by the same goroutine, just later.)
// A response of undeclared length is left alone: sent early, it would be
// chunked, where net/http would give it a Content-Length.
func (r *Recorder) SendIfComplete() {
	if r.complete() {
		http.NewResponseController(r.ResponseWriter).Flush() // an error: the client left
	}
}

func (r *Recorder) complete() bool {
	switch r.Status {
	case 0, http.StatusSwitchingProtocols:
		return false
	case http.StatusNoContent, http.StatusNotModified:
		return true
	}
	n, err := strconv.ParseInt(strings.TrimSpace(r.Header().Get("Content-Length")), 10, 64)
	return err == nil && n == r.Bytes
}

// BufferPool hands httputil.ReverseProxy reusable copy buffers, so
// streaming a large body allocates nothing per chunk.
type BufferPool struct{ p sync.Pool }

// NewBufferPool returns an empty pool of size-byte buffers. A copy moves
// at most one buffer per read and write, so the size sets how many
// syscalls a bulk transfer takes where the reader has more ready.
func NewBufferPool(size int) *BufferPool {
	return &BufferPool{p: sync.Pool{New: func() any { b := make([]byte, size); return &b }}}
}

// Get implements httputil.BufferPool.
func (b *BufferPool) Get() []byte { return *(b.p.Get().(*[]byte)) }

// Put implements httputil.BufferPool.
func (b *BufferPool) Put(x []byte) { b.p.Put(&x) }

// IsForwardingHeader reports whether a (lower-case) header name claims to
// say who is asking or which proxies a request passed. A scanner's such
// claims never cross the tunnel.
func IsForwardingHeader(lowerName string) bool {
	switch lowerName {
	case "forwarded", "x-real-ip", "via", "true-client-ip", "client-ip":
		return true
	}
	return len(lowerName) > 12 && lowerName[:12] == "x-forwarded-"
}

// IsTimeout reports whether err is a timeout of a network operation or of
// waiting for response headers.
func IsTimeout(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "timeout awaiting response headers")
}

// CountingBody counts the bytes read through it. The count is atomic:
// http.Transport may still be reading a request body in its write loop
// after the handler that owns the counter has returned.
type CountingBody struct {
	io.ReadCloser
	n atomic.Int64
}

func (c *CountingBody) Read(p []byte) (int, error) {
	n, err := c.ReadCloser.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// N is the number of bytes read so far.
func (c *CountingBody) N() int64 { return c.n.Load() }

// WebhookHeaders is the part of a webhook sender's header that travels
// with the delivery: the sender's own headers (X-Event-Key, X-Request-Id,
// X-Hub-Signature, Content-Type, User-Agent, ...) without hop-by-hop,
// framing, credential or proxy headers, and without any X-Ferry- claim.
func WebhookHeaders(in http.Header) http.Header {
	out := http.Header{}
	for k, vs := range in {
		l := strings.ToLower(k)
		switch l {
		case "authorization", "proxy-authorization", "cookie", "host", "content-length", "connection",
			"keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "expect", "proxy-connection", "accept-encoding":
			continue
		}
		if IsForwardingHeader(l) || strings.HasPrefix(l, "x-ferry-") {
			continue
		}
		out[http.CanonicalHeaderKey(k)] = append([]string(nil), vs...)
	}
	return out
}

// ErrUnknownEncoding is Unpack's answer to a Content-Encoding it cannot
// undo.
var ErrUnknownEncoding = errors.New("unknown Content-Encoding")

// Unpack undoes the Content-Encoding enc (lower case, trimmed) of body:
// body itself for none or identity, a gzip reader for gzip (decoded
// true). Any other encoding is ErrUnknownEncoding; a gzip stream that
// does not start as one is gzip's error.
func Unpack(enc string, body io.Reader) (r io.Reader, decoded bool, err error) {
	switch enc {
	case "", "identity":
		return body, false, nil
	case "gzip", "x-gzip":
		zr, err := gzip.NewReader(body)
		if err != nil {
			return nil, false, err
		}
		return zr, true, nil
	}
	return nil, false, ErrUnknownEncoding
}

// HostPort is u's host and port, the port defaulting by scheme: 80 for
// http and ws, 443 for https, wss and anything else.
func HostPort(u *url.URL) string {
	if u.Port() != "" {
		return u.Host
	}
	port := "443"
	if u.Scheme == "http" || u.Scheme == "ws" {
		port = "80"
	}
	return net.JoinHostPort(u.Hostname(), port)
}

// ErrHeadTooLarge: a response head passed its HeadLimit.
var ErrHeadTooLarge = errors.New("response head too large")

// HeadLimit reads from R, counting what it read since Reset, and until
// Lift refuses to read past the limit Reset set (ErrHeadTooLarge): a
// response head is read through it, then its body.
type HeadLimit struct {
	R     io.Reader
	N     int // bytes read since Reset
	limit int // < 0: lifted
}

// Reset starts a new head of at most limit bytes.
func (h *HeadLimit) Reset(limit int) { h.N, h.limit = 0, limit }

// Lift ends the bound: the head has been read.
func (h *HeadLimit) Lift() { h.limit = -1 }

func (h *HeadLimit) Read(p []byte) (int, error) {
	if h.limit >= 0 {
		if h.N >= h.limit {
			return 0, ErrHeadTooLarge
		}
		if len(p) > h.limit-h.N {
			p = p[:h.limit-h.N]
		}
	}
	n, err := h.R.Read(p)
	h.N += n
	return n, err
}
