package proto

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func FuzzReadHeader(f *testing.F) {
	good, _ := Header{Kind: KindHTTP, Upstream: "bitbucket", RequestID: "r1", Scanner: "s", Deadline: time.UnixMilli(42)}.MarshalBinary()
	f.Add(good)
	f.Add([]byte{'F', 'Y', 1, 2, 0, 0})
	f.Add([]byte{'F', 'Y', 1, 2, 0xff, 0xff})
	f.Add([]byte{'F', 'Y', 1, 1, 0, 3, 4, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ReadHeader(bytes.NewReader(b))
		if err != nil {
			return
		}
		// Whatever decodes must re-encode and decode to the same thing.
		enc, err := h.MarshalBinary()
		if err != nil {
			t.Fatalf("decoded header does not re-encode: %+v: %v", h, err)
		}
		h2, err := ReadHeader(bytes.NewReader(enc))
		if err != nil || h2 != h {
			t.Fatalf("re-decode: %+v vs %+v (%v)", h2, h, err)
		}
	})
}

func FuzzParseFieldValue(f *testing.F) {
	good, _ := Header{Kind: KindHTTP, Upstream: "bitbucket", RequestID: "r1", Scanner: "s", Deadline: time.UnixMilli(42)}.FieldValue()
	f.Add(good)
	f.Add(good + "AA")
	f.Add("RlkBAgAA")
	f.Add("RlkBAgAA=")
	f.Add("%%%")
	f.Add(strings.Repeat("A", maxFieldValue+1))
	f.Fuzz(func(t *testing.T, v string) {
		h, err := ParseFieldValue(v)
		if err != nil {
			return
		}
		// Whatever decodes is one whole header that round-trips.
		enc, err := h.FieldValue()
		if err != nil {
			t.Fatalf("decoded header does not re-encode: %+v: %v", h, err)
		}
		h2, err := ParseFieldValue(enc)
		if err != nil || h2 != h {
			t.Fatalf("re-decode: %+v vs %+v (%v)", h2, h, err)
		}
	})
}

func FuzzReadMessage(f *testing.F) {
	var buf bytes.Buffer
	WriteMessage(&buf, Message{Type: MsgHello, AgentID: "a", Upstreams: []string{"x"}})
	f.Add(buf.Bytes())
	f.Add([]byte{0, 0, 0, 2, '{', '}'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := ReadMessage(bytes.NewReader(b))
		if err != nil {
			return
		}
		var out bytes.Buffer
		if err := WriteMessage(&out, m); err != nil {
			t.Fatalf("decoded message does not re-encode: %v", err)
		}
	})
}
