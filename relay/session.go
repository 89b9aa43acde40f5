package relay

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/proto"
)

// agentSession is the relay's side of one agent connection. Once the
// hello is done nothing waits on an idle one: the session's conn tells it
// (through a proto.FrameWatch) when the agent opens a stream or writes on
// its control stream, and a worker goroutine for each runs only while
// there is something to do. When the conn closes, the session tears
// itself down. An idle agent so costs yamux's two goroutines, not four: a
// parked goroutine keeps a 2-8 KiB stack, times thousands of agents per
// relay.
type agentSession struct {
	r      *Relay
	t      *tunnel
	remote string
	rid    string // the upgrade request's id
	log    *slog.Logger
	sess   *yamux.Session
	// ac is the agent as its hello describes it; atomic because log lines
	// (yamux's too) may be written while the handshake sets it.
	ac atomic.Pointer[agentConn]

	// Written by the watch (yamux's receive loop), read by the workers.
	ctrlID   uint32       // the agent's first stream, its control stream; watch only
	ctrlSeen atomic.Int64 // bytes that arrived for the control stream

	// The control worker's own; the handshake's before the session is
	// established.
	ctrl     countingReader
	ctrlDone bool // the control stream ended or was unreadable

	webhooks atomic.Int32 // deliveries in flight

	mu          sync.Mutex
	established bool   // handshake done; the workers may run
	gone        bool   // the conn closed
	control     worker // reads control messages
	acceptor    worker // takes the streams the agent opens
	webhookCtx  context.Context
	stopHooks   context.CancelFunc
	wg          sync.WaitGroup // the workers, webhook deliveries, a pinger
}

// worker is the state of a goroutine started on demand: kicked when
// there is something for it, running while it is.
type worker struct {
	kicked, running bool
	pass            func() // one pass over what there is to do
}

// newAgentSession is the session of an upgraded connection from remote
// (request id rid) to tunnel t, before its hello.
func newAgentSession(r *Relay, t *tunnel, remote, rid string) *agentSession {
	a := &agentSession{r: r, t: t, remote: remote, rid: rid}
	a.log = slog.New(sessionLog{a})
	a.control.pass = a.readControl
	a.acceptor.pass = a.acceptStreams
	return a
}

// sessionLog is an agent session's log handler: it adds the connection's
// attributes when a line is written. slog's With would keep them
// formatted, in a handler copy per logger: most of a kilobyte for each of
// thousands of idle agents, for lines that come rarely.
type sessionLog struct{ a *agentSession }

func (h sessionLog) handler() slog.Handler {
	attrs := []slog.Attr{slog.String("remote", h.a.remote), slog.String("request_id", h.a.rid), slog.String("tunnel", h.a.t.id)}
	if ac := h.a.ac.Load(); ac != nil {
		attrs = append(attrs, slog.String("connection_id", ac.id), slog.String("agent_id", ac.agentID))
	}
	return h.a.r.log.Handler().WithAttrs(attrs)
}

func (h sessionLog) Enabled(ctx context.Context, l slog.Level) bool {
	return h.a.r.log.Handler().Enabled(ctx, l)
}
func (h sessionLog) Handle(ctx context.Context, rec slog.Record) error {
	return h.handler().Handle(ctx, rec)
}
func (h sessionLog) WithAttrs(as []slog.Attr) slog.Handler { return h.handler().WithAttrs(as) }
func (h sessionLog) WithGroup(name string) slog.Handler    { return h.handler().WithGroup(name) }

// countingReader counts what the relay has read of the control stream,
// so the worker knows when it has read everything that arrived.
type countingReader struct {
	s *yamux.Stream
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.s.Read(p)
	c.n += int64(n)
	return n, err
}

// sessionConn is what an agent's yamux session reads and writes: frames
// watched on the way in, batched on the way out. yamux closes it once,
// when the session ends.
type sessionConn struct {
	in     *proto.FrameWatch
	out    *proto.BatchConn
	closed func()
	once   sync.Once
}

func (c *sessionConn) Read(p []byte) (int, error)  { return c.in.Read(p) }
func (c *sessionConn) Write(p []byte) (int, error) { return c.out.Write(p) }
func (c *sessionConn) Close() error {
	err := c.out.Close()
	c.once.Do(c.closed)
	return err
}

// frame is the watch: it runs on yamux's receive loop for each incoming
// frame header, before yamux handles the frame, and must not block.
func (a *agentSession) frame(h proto.FrameHeader) {
	switch {
	case h.Opens():
		if a.ctrlID == 0 {
			a.ctrlID = h.StreamID // the handshake takes it; see handshake
			return
		}
		a.kick(&a.acceptor)
	case h.IsData() && h.Length > 0 && h.StreamID == a.ctrlID:
		a.ctrlSeen.Add(int64(h.Length))
		a.kick(&a.control)
	}
}

// kick makes sure w will look at what arrived.
func (a *agentSession) kick(w *worker) {
	a.mu.Lock()
	defer a.mu.Unlock()
	w.kicked = true
	a.startLocked(w)
}

// startLocked starts w if it was kicked and is not running, once the
// session is established and until it is gone.
func (a *agentSession) startLocked(w *worker) {
	if w.kicked && a.established && !a.gone && !w.running {
		w.running = true
		a.wg.Go(func() { a.run(w) })
	}
}

// run makes passes until one began with nothing new since the last.
func (a *agentSession) run(w *worker) {
	for {
		a.mu.Lock()
		if !w.kicked || a.gone {
			w.running = false
			a.mu.Unlock()
			return
		}
		w.kicked = false
		a.mu.Unlock()
		w.pass()
	}
}

// acceptLinger is how long the acceptor waits for a stream once the watch
// has seen one open. yamux takes a stream as soon as it has read the
// frames before it (a large frame on a slow link may take a while); it
// may also refuse one (reset it: its backlog of 256 is full), and that one
// never comes. A stream seen open while the acceptor waits makes it wait
// again; one that comes after the acceptor left waits for the next stream
// the agent opens (its retry, at worst), and is taken first.
const acceptLinger = 2 * time.Second

// acceptStreams takes the streams the agent opens (webhook deliveries)
// from yamux, serving each on a goroutine of its own, until none comes
// for acceptLinger.
func (a *agentSession) acceptStreams() {
	for {
		ctx, cancel := context.WithTimeout(a.r.life, acceptLinger)
		s, err := a.sess.AcceptStreamWithContext(ctx)
		cancel()
		if err != nil {
			return // nothing to take, or the session is over
		}
		if a.webhooks.Add(1) > maxWebhookStreams {
			a.webhooks.Add(-1)
			a.log.Warn("agent has too many webhook deliveries in flight; refusing this one (the agent retries)", "limit", maxWebhookStreams)
			s.Close()
			continue
		}
		ctx, ok := a.hookContext()
		if !ok {
			a.webhooks.Add(-1)
			s.Close()
			return
		}
		if !a.r.startHook() {
			a.webhooks.Add(-1)
			s.Close()
			continue
		}
		a.wg.Go(func() {
			defer a.r.hooks.Done()
			defer a.webhooks.Add(-1)
			a.r.serveWebhook(ctx, a.log, a.t, s)
		})
	}
}

// hookContext is the context webhook deliveries run under: it ends when
// the agent is gone, as its answer can no longer be delivered. Made on
// the first delivery; false once the session is over.
func (a *agentSession) hookContext() (context.Context, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.gone {
		return nil, false
	}
	if a.webhookCtx == nil {
		a.webhookCtx, a.stopHooks = context.WithCancel(a.r.life)
	}
	return a.webhookCtx, true
}

// readControl reads the control messages that arrived. A message the
// watch has seen only part of is waited for: the rest is on its way.
func (a *agentSession) readControl() {
	for !a.ctrlDone && a.ctrl.n < a.ctrlSeen.Load() {
		m, err := proto.ReadMessage(&a.ctrl)
		if err != nil {
			a.ctrlDone = true
			if !a.sess.IsClosed() && !errors.Is(err, io.EOF) {
				a.log.Warn("unreadable control message from agent; no longer reading its control stream", "err", err)
			}
			return
		}
		a.handleControl(m)
	}
	// yamux keeps a stream's receive buffer, sized by the largest frame
	// it held, until told: an idle agent's control stream holds nothing.
	a.ctrl.s.Shrink()
}

func (a *agentSession) handleControl(m proto.Message) {
	ac := a.ac.Load()
	switch m.Type {
	case proto.MsgDraining:
		ac.drain()
		ac.send(proto.Message{Type: proto.MsgDraining})
		a.r.syncRegistry(a.t)
		a.log.Info("agent is draining; no new requests go to this connection", "in_flight", ac.inflight.Load())
	case proto.MsgUpstreams:
		ups, err := upstreamSet(m.Upstreams)
		if err != nil {
			a.log.Warn("agent announced invalid upstreams; keeping the previous list", "err", err)
			return
		}
		ac.upstreams.Store(&ups)
		a.log.Info("agent announced new upstreams", "upstreams", strings.Join(ac.upstreamNames(), ","))
	default:
		a.log.Debug("control message from agent", "type", m.Type)
	}
}

// establish hands the session over to its watch once the agent is in the
// tunnel. It reports false if the conn closed first; the caller then
// tears down.
func (a *agentSession) establish() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.gone {
		return false
	}
	a.established = true
	if a.ac.Load().keepalive == 0 {
		// An older agent that does not ping is pinged.
		a.wg.Go(func() { pingLoop(a.r.life, a.sess, a.r.tmo().Keepalive) })
	}
	// What arrived during the handshake (a draining message, a webhook
	// delivery) is served now.
	a.startLocked(&a.control)
	a.startLocked(&a.acceptor)
	return true
}

// ended is the conn's close: it runs once, inside yamux's Session.Close,
// so the teardown gets a goroutine of its own.
func (a *agentSession) ended() {
	a.mu.Lock()
	a.gone = true
	est := a.established
	if a.stopHooks != nil {
		a.stopHooks()
	}
	a.mu.Unlock()
	if est {
		go a.finish()
	}
}

// finish takes an established connection out of its tunnel once the
// session is over and everything it started has stopped.
func (a *agentSession) finish() {
	defer a.r.sessions.Done()
	a.wg.Wait()
	ac := a.ac.Load()
	if t := ac.retireCut.Load(); t != nil {
		t.Stop()
	}
	ac.pool.close()
	a.t.remove(ac)
	a.r.syncRegistry(a.t)
	ac.connGauge.Dec()
	a.log.Info("agent disconnected", "served", ac.served.Load())
}
