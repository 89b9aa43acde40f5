package proto

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestHeaderRoundTrip(t *testing.T) {
	in := Header{Kind: KindHTTP, Upstream: "bitbucket", RequestID: "0123abcd", Scanner: "appsec", Deadline: time.UnixMilli(1_900_000_000_123)}
	b, err := in.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	// Trailing bytes belong to the HTTP request and must stay unread.
	r := bytes.NewReader(append(b, "GET / HTTP/1.1\r\n"...))
	out, err := ReadHeader(r)
	if err != nil {
		t.Fatal(err)
	}
	if out != in {
		t.Fatalf("round trip: got %+v want %+v", out, in)
	}
	rest, _ := io.ReadAll(r)
	if string(rest) != "GET / HTTP/1.1\r\n" {
		t.Fatalf("header reader consumed payload: left %q", rest)
	}
}

func TestHeaderRejects(t *testing.T) {
	good, _ := Header{Kind: KindHTTP, Upstream: "bb"}.MarshalBinary()
	mut := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	cases := map[string]struct {
		b    []byte
		want error
	}{
		"magic":          {mut(func(b []byte) []byte { b[0] = 'G'; return b }), ErrBadMagic},
		"version":        {mut(func(b []byte) []byte { b[2] = 9; return b }), ErrBadVersion},
		"kind zero":      {mut(func(b []byte) []byte { b[3] = 0; return b }), ErrMalformed},
		"huge body":      {mut(func(b []byte) []byte { binary.BigEndian.PutUint16(b[4:], 60000); return b }), ErrMalformed},
		"field overrun":  {mut(func(b []byte) []byte { binary.BigEndian.PutUint16(b[7:], 300); return b }), ErrMalformed},
		"repeated field": {append([]byte{'F', 'Y', 1, 2, 0, 10}, 1, 0, 2, 'a', 'b', 1, 0, 2, 'c', 'd'), ErrMalformed},
		"control char":   {append([]byte{'F', 'Y', 1, 2, 0, 5}, 2, 0, 2, 'a', '\n'), ErrMalformed},
		"short deadline": {append([]byte{'F', 'Y', 1, 2, 0, 5}, 4, 0, 2, 1, 1), ErrMalformed},
	}
	for name, c := range cases {
		if _, err := ReadHeader(bytes.NewReader(c.b)); !errors.Is(err, c.want) {
			t.Errorf("%s: got %v, want %v", name, err, c.want)
		}
	}
	if _, err := ReadHeader(bytes.NewReader(good[:4])); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated: got %v", err)
	}
	if _, err := (Header{Kind: KindHTTP, Upstream: strings.Repeat("x", 2000)}).MarshalBinary(); err == nil {
		t.Error("oversized field encoded without error")
	}
}

func TestHeaderFieldValue(t *testing.T) {
	in := Header{Kind: KindHTTP, Upstream: "bitbucket", RequestID: "0123abcd", Scanner: "appsec", Deadline: time.UnixMilli(1_900_000_000_123)}
	v, err := in.FieldValue()
	if err != nil {
		t.Fatal(err)
	}
	if strings.ContainsAny(v, "=+/ \r\n") {
		t.Fatalf("field value %q is not unpadded base64url", v)
	}
	out, err := ParseFieldValue(v)
	if err != nil || out != in {
		t.Fatalf("round trip: got %+v, %v; want %+v", out, err, in)
	}
	if want := base64.RawURLEncoding.EncodedLen(headerFixedLen + MaxHeaderBody); maxFieldValue != want {
		t.Fatalf("maxFieldValue %d, want %d", maxFieldValue, want)
	}
	two, _ := Header{Kind: KindHTTP, Upstream: "x"}.MarshalBinary()
	for name, bad := range map[string]string{
		"empty":          "",
		"not base64":     "FY!!",
		"padded":         v + "=",
		"trailing bytes": base64.RawURLEncoding.EncodeToString(append(two, "ABC"...)),
		"two headers":    base64.RawURLEncoding.EncodeToString(append(two, two...)),
		"bad magic":      base64.RawURLEncoding.EncodeToString([]byte("GET / HTTP/1.1")),
		"oversized":      strings.Repeat("A", maxFieldValue+4),
	} {
		if _, err := ParseFieldValue(bad); err == nil {
			t.Errorf("%s: %q decoded without error", name, bad)
		}
	}
}

func TestHeaderSkipsUnknownFields(t *testing.T) {
	b := append([]byte{'F', 'Y', 1, 2, 0, 11}, 99, 0, 3, 'x', 'y', 'z', 1, 0, 2, 'b', 'b')
	h, err := ReadHeader(bytes.NewReader(b))
	if err != nil || h.Upstream != "bb" {
		t.Fatalf("got %+v, %v", h, err)
	}
}

func TestControlRoundTripAndLimits(t *testing.T) {
	var buf bytes.Buffer
	in := Message{Type: MsgHello, AgentID: "a1", Version: "v1", Upstreams: []string{"bitbucket"}}
	if err := WriteMessage(&buf, in); err != nil {
		t.Fatal(err)
	}
	out, err := ReadMessage(&buf)
	if err != nil || out.AgentID != "a1" || len(out.Upstreams) != 1 {
		t.Fatalf("got %+v, %v", out, err)
	}
	huge := binary.BigEndian.AppendUint32(nil, MaxControlMessage+1)
	if _, err := ReadMessage(bytes.NewReader(huge)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("oversize: %v", err)
	}
	notype := append(binary.BigEndian.AppendUint32(nil, 2), "{}"...)
	if _, err := ReadMessage(bytes.NewReader(notype)); !errors.Is(err, ErrMalformed) {
		t.Fatalf("no type: %v", err)
	}
}

// recordConn records each Write as one message, like wsConn.
type recordConn struct {
	net.Conn
	mu     sync.Mutex
	msgs   [][]byte
	closed bool
}

func (r *recordConn) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.msgs = append(r.msgs, append([]byte(nil), p...))
	return len(p), nil
}

func (r *recordConn) Close() error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	return nil
}

func (r *recordConn) all() (msgs [][]byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append(msgs, r.msgs...)
}

func TestCoalesceKeepsOrderAndHeadersWithBodies(t *testing.T) {
	rec := &recordConn{}
	c := Coalesce(rec, nil)
	data := func(body string) []byte {
		h := []byte{0, yamuxTypeData, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0}
		binary.BigEndian.PutUint32(h[8:], uint32(len(body)))
		return h
	}
	win := []byte{0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0} // window update: no body
	var want []byte
	for i := 0; i < 500; i++ {
		body := strings.Repeat(string(rune('a'+i%26)), 1+i%300)
		for _, p := range [][]byte{data(body), []byte(body), win} {
			if _, err := c.Write(p); err != nil {
				t.Fatal(err)
			}
			want = append(want, p...)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		var got []byte
		for _, m := range rec.all() {
			got = append(got, m...)
		}
		if bytes.Equal(got, want) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("flushed %d of %d bytes, or out of order", len(got), len(want))
		}
		time.Sleep(5 * time.Millisecond)
	}
	// No message may end with a data header whose body went elsewhere.
	for _, m := range rec.all() {
		if len(m) >= yamuxHeaderLen {
			tail := m[len(m)-yamuxHeaderLen:]
			if tail[1] == yamuxTypeData && binary.BigEndian.Uint32(tail[8:]) > 0 && bytes.HasPrefix(m, tail) && len(m) == yamuxHeaderLen {
				t.Fatal("a data header was sent without its body")
			}
		}
	}
	if n := len(rec.all()); n >= 1500 {
		t.Logf("no batching happened (%d messages for 1500 frames)", n)
	}
	c.Close()
	if _, err := c.Write(win); err == nil {
		t.Fatal("write after close succeeded")
	}
}

type failConn struct{ net.Conn }

func (failConn) Write([]byte) (int, error) { return 0, errors.New("broken pipe") }
func (failConn) Close() error              { return nil }

func TestCoalesceReportsWriteErrors(t *testing.T) {
	c := Coalesce(failConn{}, nil)
	defer c.Close()
	win := []byte{0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0}
	c.Write(win)
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, err := c.Write(win); err != nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("a failed flush was never reported")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
