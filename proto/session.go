package proto

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/hashicorp/yamux"
)

// Tunables shared by both ends. yamux wants the same AcceptBacklog on both
// sides, so they live here and not in either program's config.
const (
	// A stream's receive window bounds what one stream moves (a window
	// per RTT) and what it may buffer at the receiving end, where yamux's
	// buffer grows by doubling: up to twice the window of heap.
	//
	// RelayStreamWindow is the relay's, for what agents send: responses,
	// clones, downloads, the bulk of the traffic.
	RelayStreamWindow = 4 << 20
	// AgentStreamWindow is the agent's, for what scanners send: request
	// bodies, rarely large. Half the relay's halves what an upload to a
	// slow upstream holds on the broker VM (agent peak RSS 43-51 MiB ->
	// 34-38 over three upload runs), with no loss measured in the upload
	// benchmark; at 50 ms RTT one stream still uploads 40 MiB/s.
	AgentStreamWindow = 2 << 20
	// WriteTimeout bounds a write of the session's, and how long a ping
	// may go unanswered.
	WriteTimeout   = 10 * time.Second
	acceptBacklog  = 256
	streamOpenWait = 30 * time.Second
)

// YamuxConfig is the session configuration both ends use. keepalive is
// the ping interval (default 15 s, well below the 60 s idle timeout common
// on cloud load balancers, so a quiet tunnel is never cut); a session
// whose ping goes unanswered for ConnectionWriteTimeout is closed.
// keepalive 0: this end sends no pings (the relay, whose agents ping; see
// BatchConn.SetReadIdle). window is this end's per-stream receive window
// (RelayStreamWindow or AgentStreamWindow).
func YamuxConfig(log *slog.Logger, keepalive time.Duration, window uint32) *yamux.Config {
	c := yamux.DefaultConfig()
	c.AcceptBacklog = acceptBacklog
	c.EnableKeepAlive = keepalive > 0
	if keepalive > 0 {
		c.KeepAliveInterval = keepalive
	}
	c.ConnectionWriteTimeout = WriteTimeout
	c.MaxStreamWindowSize = window
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

// Coalesce wraps a message-oriented conn (wsConn turns every Write into
// one WebSocket message, one TLS record and one syscall) so that yamux
// frames are batched: Write queues the frame and a flusher
// goroutine writes everything queued as one message. Nothing waits on a
// timer: an idle tunnel sends a lone frame at once, a busy one sends many
// frames per message. The flusher runs only while there is something to
// send, so an idle tunnel costs no goroutine here. A data frame's 12-byte
// header, which yamux writes separately from its body, is held until the
// body is queued. Queued bytes are bounded: Write blocks past maxQueued
// (backpressure). A write error is returned by the next Write and closes
// the conn.
//
// cork, if not nil, holds the writes beneath c (see Cork): each batch is
// written with it corked, so the batch leaves in full TLS records and one
// syscall.
func Coalesce(c net.Conn, cork Corker) *BatchConn {
	b := &BatchConn{Conn: c, cork: cork}
	b.space = sync.NewCond(&b.mu)
	return b
}

const (
	maxQueued    = 1 << 20
	keepBuffer   = 64 << 10 // buffers up to this size are always kept
	releaseAfter = 5 * time.Second
)

// BatchConn is the conn Coalesce returns: frames batched on the way out,
// and optionally an idle limit on the way in (SetReadIdle).
type BatchConn struct {
	net.Conn
	cork     Corker
	readIdle atomic.Int64   // nanoseconds; 0: reads wait as long as it takes
	flusher  sync.WaitGroup // the running flusher, if any

	mu         sync.Mutex
	space      *sync.Cond // signalled when the queue drains
	queue      []byte
	spare      []byte // the flusher's last output buffer, reused
	holdHeader bool   // the queue ends with a data header awaiting its body
	flushing   bool   // a flusher goroutine is running
	idleSince  time.Time
	err        error
	closed     bool
	closeOnce  sync.Once
}

const (
	yamuxHeaderLen = 12
	yamuxTypeData  = 0
)

func (b *BatchConn) Write(p []byte) (int, error) {
	b.mu.Lock()
	for len(b.queue) >= maxQueued && b.err == nil && !b.closed {
		b.space.Wait()
	}
	if b.err != nil || b.closed {
		err := b.err
		b.mu.Unlock()
		if err == nil {
			err = net.ErrClosed
		}
		return 0, err
	}
	if !b.flushing && time.Since(b.idleSince) > releaseAfter {
		// Burst-sized buffers go once the connection has been quiet, so
		// thousands of idle tunnels pin no megabytes; a busy one keeps
		// reusing its own.
		if cap(b.spare) > keepBuffer {
			b.spare = nil
		}
		if cap(b.queue) > keepBuffer {
			b.queue = append([]byte(nil), b.queue...)
		}
	}
	b.queue = append(b.queue, p...)
	// A data header with a body to follow waits for it, so both go out
	// together; anything else may be sent now.
	b.holdHeader = len(p) == yamuxHeaderLen && p[1] == yamuxTypeData && binary.BigEndian.Uint32(p[8:12]) > 0
	start := !b.holdHeader && !b.flushing
	if start {
		b.flushing = true
		b.flusher.Add(1)
	}
	b.mu.Unlock()
	if start {
		go b.flush()
	}
	return len(p), nil
}

// flush writes what is queued, batch after batch, and exits when the
// queue is empty (Write starts a new one).
func (b *BatchConn) flush() {
	defer b.flusher.Done()
	for {
		b.mu.Lock()
		n := len(b.queue)
		if b.holdHeader {
			n -= yamuxHeaderLen // its body is not queued yet
		}
		if b.closed || n == 0 {
			b.flushing = false
			b.idleSince = time.Now()
			b.mu.Unlock()
			return
		}
		// Swap buffers rather than copy: the queue goes out as it is and
		// the spare becomes the queue (with a held header, if any).
		out := b.queue[:n]
		b.queue = append(b.spare[:0], b.queue[n:]...)
		b.spare = nil
		b.space.Broadcast()
		b.mu.Unlock()
		if b.cork != nil {
			b.cork.Cork()
		}
		_, err := b.Conn.Write(out)
		if b.cork != nil {
			if uerr := b.cork.Uncork(); err == nil {
				err = uerr
			}
		}
		b.mu.Lock()
		b.spare = out
		if err != nil {
			b.err = err
			b.flushing = false
			b.space.Broadcast()
			b.mu.Unlock()
			b.Conn.Close()
			return
		}
		b.mu.Unlock()
	}
}

// SetReadIdle makes the conn fail (and close) when nothing arrives for d;
// 0 turns it off. With a peer that pings every interval, a silent
// connection is a dead one, found without pinging it.
func (b *BatchConn) SetReadIdle(d time.Duration) {
	b.readIdle.Store(int64(d))
	// Also for the read already waiting.
	if d == 0 {
		b.Conn.SetReadDeadline(time.Time{})
	} else {
		b.Conn.SetReadDeadline(time.Now().Add(d))
	}
}

// Read reads, renewing the idle deadline if one is set.
func (b *BatchConn) Read(p []byte) (int, error) {
	if d := b.readIdle.Load(); d > 0 {
		b.Conn.SetReadDeadline(time.Now().Add(time.Duration(d)))
	}
	return b.Conn.Read(p)
}

// Close stops the flusher and closes the conn. Frames still queued are
// dropped: yamux closes its conn only when the session is over.
func (b *BatchConn) Close() error {
	var err error
	b.closeOnce.Do(func() {
		b.mu.Lock()
		b.closed = true
		b.space.Broadcast()
		b.mu.Unlock()
		err = b.Conn.Close() // unblocks a flusher stuck in Write
		b.flusher.Wait()
	})
	return err
}

// WebSocketConn adapts an accepted or dialled WebSocket to the net.Conn
// yamux runs on. ctx bounds the connection's life; cork, if not nil,
// holds the writes beneath the WebSocket (see Coalesce). Close is immediate
// (CloseNow): yamux closes its conn when a session dies, often because the
// peer is gone, and a close handshake would then block for up to 10 s.
func WebSocketConn(ctx context.Context, c *websocket.Conn, cork Corker) *BatchConn {
	return Coalesce(newWSConn(ctx, c), cork)
}
