package proto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"strings"
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

// recordConn records each Write as one message, like websocket.NetConn.
type recordConn struct {
	net.Conn
	msgs [][]byte
}

func (r *recordConn) Write(p []byte) (int, error) {
	r.msgs = append(r.msgs, append([]byte(nil), p...))
	return len(p), nil
}

func TestCoalesceJoinsDataHeaderAndBody(t *testing.T) {
	rec := &recordConn{}
	c := Coalesce(rec)
	data := []byte{0, yamuxTypeData, 0, 0, 0, 0, 0, 1, 0, 0, 0, 5}
	win := []byte{0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0} // window update: no body
	c.Write(data)
	c.Write([]byte("hello"))
	c.Write(win)
	c.Write(data)
	c.Write([]byte("world"))
	if len(rec.msgs) != 3 {
		t.Fatalf("want 3 messages, got %d: %q", len(rec.msgs), rec.msgs)
	}
	if !bytes.Equal(rec.msgs[0], append(append([]byte(nil), data...), "hello"...)) || !bytes.Equal(rec.msgs[1], win) ||
		!bytes.HasSuffix(rec.msgs[2], []byte("world")) {
		t.Fatalf("messages: %q", rec.msgs)
	}
}
