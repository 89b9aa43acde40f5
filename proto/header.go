// Package proto holds ferry's wire protocol: the WebSocket handshake
// constants, the per-stream header that precedes every yamux stream, the
// control-stream messages, and the yamux/WebSocket plumbing both sides share.
package proto

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// Subprotocol is the WebSocket subprotocol both sides must agree on.
const Subprotocol = "ferry.v1"

// ConnectPath is where agents dial the relay.
const ConnectPath = "/v1/connect"

// Stream kinds. The kind says what follows the header on the stream.
type Kind uint8

const (
	// KindControl is the one control stream per session, opened by the agent.
	KindControl Kind = 1
	// KindHTTP is a scanner request, opened by the relay; HTTP/1.1 follows.
	KindHTTP Kind = 2
	// KindWebhook is a webhook delivery, opened by the agent; HTTP/1.1 follows.
	KindWebhook Kind = 3
	// KindHTTPKeepAlive carries scanner requests one after another, opened
	// by the relay for an agent that announced CapKeepAlive: HTTP/1.1 with
	// keep-alive follows, and each request carries its own header in the
	// StreamHeaderField field (the stream header's fields are not used).
	KindHTTPKeepAlive Kind = 4
)

// CapKeepAlive is the hello capability of an agent that serves
// KindHTTPKeepAlive streams.
const CapKeepAlive = "http-keepalive"

// StreamHeaderField is the HTTP request header field that carries a
// request's Header on a KindHTTPKeepAlive stream: the binary encoding in
// unpadded base64url. Both ends strip X-Ferry-* fields a scanner sent, so
// only the relay can set it, and the agent never forwards it.
const StreamHeaderField = "X-Ferry-Stream"

func (k Kind) String() string {
	switch k {
	case KindControl:
		return "control"
	case KindHTTP:
		return "http"
	case KindWebhook:
		return "webhook"
	case KindHTTPKeepAlive:
		return "http-keepalive"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// Header is the small versioned preamble at the start of every stream.
//
// Encoding (big endian):
//
//	magic "FY" | version u8 | kind u8 | body length u16 | body
//
// The body is a sequence of fields, each: tag u8 | length u16 | value.
// Unknown tags are skipped so later minor additions stay compatible; a
// repeated known tag is an error because it would be ambiguous.
type Header struct {
	Kind      Kind
	Upstream  string    // KindHTTP: which configured upstream
	RequestID string    // every kind: ties both sides' logs together
	Scanner   string    // KindHTTP: the authenticated scanner's name
	Deadline  time.Time // zero: none
}

const (
	headerVersion  = 1
	headerFixedLen = 6
	// MaxHeaderBody bounds the header so a lying peer cannot make us
	// allocate much; real headers are well under 200 bytes.
	MaxHeaderBody = 4096
	maxFieldLen   = 1024

	tagUpstream  = 1
	tagRequestID = 2
	tagScanner   = 3
	tagDeadline  = 4
)

var headerMagic = [2]byte{'F', 'Y'}

// Errors a decoder reports; wrapped with detail.
var (
	ErrBadMagic   = errors.New("not a ferry stream header")
	ErrBadVersion = errors.New("unsupported stream header version")
	ErrMalformed  = errors.New("malformed stream header")
)

// MarshalBinary encodes h. It fails only on fields too long to encode.
func (h Header) MarshalBinary() ([]byte, error) {
	if h.Kind == 0 {
		return nil, fmt.Errorf("encode stream header: kind not set")
	}
	body := make([]byte, 0, 64)
	var err error
	addString := func(tag byte, v string) {
		if v == "" || err != nil {
			return
		}
		if len(v) > maxFieldLen {
			err = fmt.Errorf("encode stream header: field %d is %d bytes, limit %d", tag, len(v), maxFieldLen)
			return
		}
		body = append(body, tag)
		body = binary.BigEndian.AppendUint16(body, uint16(len(v)))
		body = append(body, v...)
	}
	addString(tagUpstream, h.Upstream)
	addString(tagRequestID, h.RequestID)
	addString(tagScanner, h.Scanner)
	if err != nil {
		return nil, err
	}
	if !h.Deadline.IsZero() {
		body = append(body, tagDeadline, 0, 8)
		body = binary.BigEndian.AppendUint64(body, uint64(h.Deadline.UnixMilli()))
	}
	if len(body) > MaxHeaderBody {
		return nil, fmt.Errorf("encode stream header: %d bytes, limit %d", len(body), MaxHeaderBody)
	}
	out := make([]byte, 0, headerFixedLen+len(body))
	out = append(out, headerMagic[0], headerMagic[1], headerVersion, byte(h.Kind))
	out = binary.BigEndian.AppendUint16(out, uint16(len(body)))
	return append(out, body...), nil
}

// FieldValue encodes h for StreamHeaderField.
func (h Header) FieldValue() (string, error) {
	b, err := h.MarshalBinary()
	if err != nil {
		return "", err
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// maxFieldValue is the longest StreamHeaderField value a header can
// encode to (unpadded base64: 4 characters per 3 bytes, rounded up).
const maxFieldValue = ((headerFixedLen+MaxHeaderBody)*8 + 5) / 6

// ParseFieldValue decodes a StreamHeaderField value: one whole header,
// nothing before or after it.
func ParseFieldValue(v string) (Header, error) {
	if len(v) > maxFieldValue {
		return Header{}, fmt.Errorf("%w: %s of %d bytes exceeds %d", ErrMalformed, StreamHeaderField, len(v), maxFieldValue)
	}
	b, err := base64.RawURLEncoding.DecodeString(v)
	if err != nil {
		return Header{}, fmt.Errorf("%w: %s: %v", ErrMalformed, StreamHeaderField, err)
	}
	r := bytes.NewReader(b)
	h, err := ReadHeader(r)
	if err != nil {
		return Header{}, err
	}
	if r.Len() != 0 {
		return Header{}, fmt.Errorf("%w: %d bytes after the header in %s", ErrMalformed, r.Len(), StreamHeaderField)
	}
	return h, nil
}

// WriteHeader encodes h and writes it to w in one write.
func WriteHeader(w io.Writer, h Header) error {
	b, err := h.MarshalBinary()
	if err != nil {
		return err
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("write stream header: %w", err)
	}
	return nil
}

// ReadHeader reads exactly one header from r and nothing more, so the
// bytes after it are left for the HTTP parser.
func ReadHeader(r io.Reader) (Header, error) {
	var fixed [headerFixedLen]byte
	if _, err := io.ReadFull(r, fixed[:]); err != nil {
		return Header{}, fmt.Errorf("read stream header: %w", err)
	}
	if fixed[0] != headerMagic[0] || fixed[1] != headerMagic[1] {
		return Header{}, ErrBadMagic
	}
	if fixed[2] != headerVersion {
		return Header{}, fmt.Errorf("%w: %d (this build speaks %d)", ErrBadVersion, fixed[2], headerVersion)
	}
	n := int(binary.BigEndian.Uint16(fixed[4:6]))
	if n > MaxHeaderBody {
		return Header{}, fmt.Errorf("%w: body of %d bytes exceeds %d", ErrMalformed, n, MaxHeaderBody)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return Header{}, fmt.Errorf("read stream header body: %w", err)
	}
	h := Header{Kind: Kind(fixed[3])}
	if h.Kind == 0 {
		return Header{}, fmt.Errorf("%w: kind 0", ErrMalformed)
	}
	return h, h.decodeFields(body)
}

func (h *Header) decodeFields(body []byte) error {
	var seen [256]bool
	for len(body) > 0 {
		if len(body) < 3 {
			return fmt.Errorf("%w: truncated field", ErrMalformed)
		}
		tag, l := body[0], int(binary.BigEndian.Uint16(body[1:3]))
		body = body[3:]
		if l > len(body) {
			return fmt.Errorf("%w: field %d claims %d bytes, %d left", ErrMalformed, tag, l, len(body))
		}
		v := body[:l]
		body = body[l:]
		if seen[tag] {
			return fmt.Errorf("%w: field %d repeated", ErrMalformed, tag)
		}
		seen[tag] = true
		switch tag {
		case tagUpstream:
			h.Upstream = string(v)
		case tagRequestID:
			h.RequestID = string(v)
		case tagScanner:
			h.Scanner = string(v)
		case tagDeadline:
			if l != 8 {
				return fmt.Errorf("%w: deadline is %d bytes, want 8", ErrMalformed, l)
			}
			ms := int64(binary.BigEndian.Uint64(v))
			if ms <= 0 {
				return fmt.Errorf("%w: deadline %d", ErrMalformed, ms)
			}
			h.Deadline = time.UnixMilli(ms)
		default:
			// Unknown tag from a newer peer: skip.
		}
		if (tag == tagUpstream || tag == tagRequestID || tag == tagScanner) && !printable(v) {
			return fmt.Errorf("%w: field %d has non-printable bytes", ErrMalformed, tag)
		}
	}
	return nil
}

// printable reports whether b is visible ASCII: these fields end up in
// logs and HTTP headers, where control characters would be an injection.
func printable(b []byte) bool {
	for _, c := range b {
		if c < 0x21 || c > 0x7e {
			return false
		}
	}
	return true
}
