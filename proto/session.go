package proto

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"
)

// Tunables shared by both ends. yamux wants the same AcceptBacklog on both
// sides, so they live here and not in either program's config.
const (
	// StreamWindow is the per-stream receive window: one stream moves at
	// most StreamWindow/RTT, and each stream may buffer up to this much.
	StreamWindow   = 1 << 20
	acceptBacklog  = 256
	writeTimeout   = 10 * time.Second
	streamOpenWait = 30 * time.Second
)

// YamuxConfig is the session configuration both ends use. keepalive is
// the ping interval (default 15 s, well below the 60 s idle timeout common
// on cloud load balancers, so a quiet tunnel is never cut); a session
// whose ping goes unanswered for ConnectionWriteTimeout is closed.
func YamuxConfig(log *slog.Logger, keepalive time.Duration) *yamux.Config {
	c := yamux.DefaultConfig()
	c.AcceptBacklog = acceptBacklog
	c.EnableKeepAlive = true
	c.KeepAliveInterval = keepalive
	c.ConnectionWriteTimeout = writeTimeout
	c.MaxStreamWindowSize = StreamWindow
	c.StreamOpenTimeout = streamOpenWait
	c.StreamCloseTimeout = time.Minute
	c.LogOutput = nil
	c.Logger = yamuxLogger{log}
	return c
}

// yamuxLogger routes yamux's printf logging into slog at debug level,
// except errors, which yamux prefixes with [ERR].
type yamuxLogger struct{ log *slog.Logger }

func (l yamuxLogger) Print(v ...any)   { l.emit(fmt.Sprint(v...)) }
func (l yamuxLogger) Println(v ...any) { l.emit(fmt.Sprint(v...)) }
func (l yamuxLogger) Printf(f string, v ...any) {
	l.emit(fmt.Sprintf(f, v...))
}

func (l yamuxLogger) emit(s string) {
	s = strings.TrimSpace(s)
	level := slog.LevelDebug
	// A session ending because its connection closed is routine and is
	// logged by the owner with context; only other errors are warnings.
	routine := strings.Contains(s, "EOF") || strings.Contains(s, "context canceled") ||
		strings.Contains(s, "closed") || strings.Contains(s, "reset by peer")
	if (strings.HasPrefix(s, "[ERR]") || strings.HasPrefix(s, "[WARN]")) && !routine {
		level = slog.LevelWarn
	}
	l.log.Log(context.Background(), level, s, "component", "yamux")
}

// Coalesce wraps a message-oriented conn (websocket.NetConn turns every
// Write into one WebSocket message) so that a yamux data frame's 12-byte
// header and its body, which yamux writes separately, go out as one message.
// yamux writes from a single goroutine (its send loop), which is what makes
// holding the header until the body arrives safe.
func Coalesce(c net.Conn) net.Conn { return &coalescingConn{Conn: c} }

type coalescingConn struct {
	net.Conn
	pending bool
	buf     []byte // header, then header+body; reused between frames
}

const (
	yamuxHeaderLen = 12
	yamuxTypeData  = 0
)

func (c *coalescingConn) Write(p []byte) (int, error) {
	if c.pending {
		c.pending = false
		c.buf = append(c.buf[:yamuxHeaderLen], p...)
		if _, err := c.Conn.Write(c.buf); err != nil {
			return 0, err
		}
		if cap(c.buf) > 2*StreamWindow {
			c.buf = nil // do not pin a rare huge buffer
		}
		return len(p), nil
	}
	if len(p) == yamuxHeaderLen && p[1] == yamuxTypeData && binary.BigEndian.Uint32(p[8:12]) > 0 {
		c.buf = append(c.buf[:0], p...)
		c.pending = true
		return len(p), nil
	}
	return c.Conn.Write(p)
}

// WebSocketConn adapts an accepted or dialled WebSocket to the net.Conn
// yamux runs on. ctx bounds the connection's life. Close is immediate
// (CloseNow): yamux closes its conn when a session dies, often because the
// peer is gone, and a close handshake would then block for up to 10 s.
func WebSocketConn(ctx context.Context, c *websocket.Conn) net.Conn {
	return Coalesce(closeNowConn{websocket.NetConn(ctx, c, websocket.MessageBinary), c})
}

type closeNowConn struct {
	net.Conn
	ws *websocket.Conn
}

func (c closeNowConn) Close() error {
	err := c.ws.CloseNow()
	c.Conn.Close()
	return err
}
