package relay

import (
	"bufio"
	"io"
	"net"
	"net/http"

	"github.com/ferry-tunnel/ferry/proto"
)

// leanHijack is the ResponseWriter the relay gives websocket.Accept. The
// WebSocket keeps the buffers the hijack returns for the connection's
// life; the HTTP server's are 4 KiB each, 8 KiB of the ~26 KiB of live
// heap an idle agent cost. Here they are small. Writes go through a cork,
// added to the connection's slot, so that the small write buffer does not
// cut a batch of frames into small TLS records: the batch reaches TLS in
// one write, as with the agent's cork above TLS.
type leanHijack struct {
	http.ResponseWriter
	slot *proto.CorkSlot // nil: no cork
}

const (
	// upgradedReadBuffer holds a frame header and a small frame; larger
	// reads go past it, straight to TLS.
	upgradedReadBuffer = 256
	// upgradedWriteBuffer holds a frame header and a small frame.
	upgradedWriteBuffer = 512
)

func (w leanHijack) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	if brw.Reader.Buffered() > 0 || brw.Writer.Buffered() > 0 {
		// Bytes already read from the agent (it may not send before the
		// 101, but if it did, they are kept) or not yet written.
		return c, brw, nil
	}
	var out io.Writer = c
	if w.slot != nil {
		cork := proto.NewCork(c)
		w.slot.Add(cork)
		out = cork
	}
	return c, bufio.NewReadWriter(bufio.NewReaderSize(c, upgradedReadBuffer), bufio.NewWriterSize(out, upgradedWriteBuffer)), nil
}
