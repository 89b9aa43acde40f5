package proto

import (
	"encoding/binary"
	"io"
)

// FrameHeader is a yamux frame header as it crosses the wire.
type FrameHeader struct {
	Type     uint8
	Flags    uint16
	StreamID uint32
	// Length is a data frame's body length; for the other types, their
	// value (window increment, ping id, go-away code).
	Length uint32
}

const (
	yamuxVersion          = 0
	yamuxTypeWindowUpdate = 1
	yamuxFlagSYN          = 1
)

// Opens reports whether the frame opens a stream: yamux marks a stream's
// first frame, data or window update, with SYN (on a ping, SYN means a
// request, not a stream).
func (h FrameHeader) Opens() bool {
	return (h.Type == yamuxTypeData || h.Type == yamuxTypeWindowUpdate) && h.Flags&yamuxFlagSYN != 0
}

// IsData reports whether the frame carries Length bytes for its stream.
func (h FrameHeader) IsData() bool { return h.Type == yamuxTypeData }

// FrameWatch passes the bytes a yamux session reads through unchanged and
// tells fn about each frame header in them, just before the session
// handles the frame. With it, the owner of a session learns that a stream
// was opened or that data arrived for one without a goroutine parked in
// AcceptStream or Stream.Read for the whole life of an idle session.
//
// fn runs on the reading goroutine (yamux's receive loop) and must not
// block. Bytes that are not yamux (a wrong version) end the watching: the
// session fails on them by itself.
type FrameWatch struct {
	r    io.Reader
	fn   func(FrameHeader)
	hdr  [yamuxHeaderLen]byte
	nhdr int    // bytes of the next header seen so far
	body uint32 // bytes of the current data frame's body still to come
	lost bool
}

// WatchFrames returns r watched: see FrameWatch.
func WatchFrames(r io.Reader, fn func(FrameHeader)) *FrameWatch {
	return &FrameWatch{r: r, fn: fn}
}

func (w *FrameWatch) Read(p []byte) (int, error) {
	n, err := w.r.Read(p)
	w.scan(p[:n])
	return n, err
}

// scan walks b, which continues the stream where the last call left off.
func (w *FrameWatch) scan(b []byte) {
	for len(b) > 0 && !w.lost {
		if w.body > 0 {
			k := uint32(min(len(b), int(min(w.body, 1<<30))))
			w.body -= k
			b = b[k:]
			continue
		}
		k := copy(w.hdr[w.nhdr:], b)
		w.nhdr += k
		b = b[k:]
		if w.nhdr < yamuxHeaderLen {
			return
		}
		w.nhdr = 0
		if w.hdr[0] != yamuxVersion {
			w.lost = true
			return
		}
		h := FrameHeader{
			Type:     w.hdr[1],
			Flags:    binary.BigEndian.Uint16(w.hdr[2:4]),
			StreamID: binary.BigEndian.Uint32(w.hdr[4:8]),
			Length:   binary.BigEndian.Uint32(w.hdr[8:12]),
		}
		if h.IsData() {
			w.body = h.Length
		}
		w.fn(h)
	}
}
