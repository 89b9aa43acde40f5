package spool

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// Delivery is one webhook as Bitbucket sent it.
type Delivery struct {
	ID       string      `json:"id"`
	Received time.Time   `json:"received"`
	Repo     string      `json:"repo,omitempty"`  // "PROJ/slug", for per-repository order
	Event    string      `json:"event,omitempty"` // X-Event-Key
	Header   http.Header `json:"header"`
	Body     []byte      `json:"-"`
}

// File format, version 1:
//
//	"FERRY-DELIVERY 1\n" | meta JSON | "\n" | body
//
// meta carries the Delivery fields plus body_len and body_sha256, so a
// truncated or altered file is detected rather than delivered wrong.
const (
	magic = "FERRY-DELIVERY 1\n"
	// MaxMeta bounds the metadata line (headers); Bitbucket's are small.
	MaxMeta = 256 << 10
	// MaxBody bounds a body the decoder accepts.
	MaxBody = 64 << 20
	// maxFile bounds a spool file as read: what Encode can write. A
	// larger one (or anything but a regular file) found in the spool is
	// quarantined unread.
	maxFile = int64(len(magic) + MaxMeta + 1 + MaxBody)
)

type meta struct {
	Delivery
	BodyLen    int    `json:"body_len"`
	BodySHA256 string `json:"body_sha256"`
}

// ErrCorrupt wraps every decoding failure.
var ErrCorrupt = errors.New("corrupt spool file")

// Encode renders d in the spool file format.
func (d Delivery) Encode() ([]byte, error) {
	if len(d.Body) > MaxBody {
		return nil, fmt.Errorf("encode delivery %s: body of %d bytes exceeds %d", d.ID, len(d.Body), MaxBody)
	}
	sum := sha256.Sum256(d.Body)
	m, err := json.Marshal(meta{Delivery: d, BodyLen: len(d.Body), BodySHA256: hex.EncodeToString(sum[:])})
	if err != nil {
		return nil, fmt.Errorf("encode delivery %s: %w", d.ID, err)
	}
	if len(m) > MaxMeta {
		return nil, fmt.Errorf("encode delivery %s: headers take %d bytes, limit %d", d.ID, len(m), MaxMeta)
	}
	out := make([]byte, 0, len(magic)+len(m)+1+len(d.Body))
	out = append(out, magic...)
	out = append(out, m...)
	out = append(out, '\n')
	return append(out, d.Body...), nil
}

// Decode parses a spool file, checking its length and checksum.
func Decode(data []byte) (Delivery, error) {
	rest, ok := bytes.CutPrefix(data, []byte(magic))
	if !ok {
		return Delivery{}, fmt.Errorf("%w: no FERRY-DELIVERY 1 header", ErrCorrupt)
	}
	i := bytes.IndexByte(rest[:min(len(rest), MaxMeta+1)], '\n')
	if i < 0 {
		return Delivery{}, fmt.Errorf("%w: metadata line missing or over %d bytes", ErrCorrupt, MaxMeta)
	}
	var m meta
	if err := json.Unmarshal(rest[:i], &m); err != nil {
		return Delivery{}, fmt.Errorf("%w: metadata: %v", ErrCorrupt, err)
	}
	body := rest[i+1:]
	if m.BodyLen != len(body) {
		return Delivery{}, fmt.Errorf("%w: body is %d bytes, metadata says %d (truncated?)", ErrCorrupt, len(body), m.BodyLen)
	}
	sum := sha256.Sum256(body)
	if hex.EncodeToString(sum[:]) != m.BodySHA256 {
		return Delivery{}, fmt.Errorf("%w: body checksum mismatch", ErrCorrupt)
	}
	if !validID(m.ID) {
		return Delivery{}, fmt.Errorf("%w: invalid delivery id %q", ErrCorrupt, m.ID)
	}
	d := m.Delivery
	if d.Header == nil {
		d.Header = http.Header{}
	}
	d.Body = body
	return d, nil
}
