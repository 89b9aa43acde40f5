package relay

import (
	"errors"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/ferry-tunnel/ferry/internal/token"
	"github.com/ferry-tunnel/ferry/proto"
)

// tunnel is one configured tunnel and the agent connections serving it.
type tunnel struct {
	id       string
	requests atomic.Int64 // scanner requests in flight, for limits.max_streams_per_tunnel

	mu      sync.Mutex
	conns   []*agentConn
	joining int // connections in their handshake (join)

	regMu sync.Mutex // orders registry updates for this tunnel
}

// agentConn is one live, registered agent connection (one WebSocket, one
// yamux session).
type agentConn struct {
	id          string
	tunnel      *tunnel
	agentID     string
	version     string
	upstreams   atomic.Pointer[[]string] // sorted (upstreamSet); replaced when the agent reloads
	remote      string
	tokenHash   token.Hash // which agent token opened it (revocation on reload)
	connectedAt time.Time
	sess        *yamux.Session
	keepalive   time.Duration // the agent's ping interval; 0: it did not say
	// keepAlive: the agent serves keep-alive streams (proto.CapKeepAlive);
	// pool holds those idle between requests.
	keepAlive bool
	pool      streamPool

	inflight atomic.Int64
	served   atomic.Int64
	draining atomic.Bool
	// openMu orders new streams against draining: held shared while one
	// opens, alone while draining is set. A stream opened before that
	// reaches the agent ahead of the relay's ack of its draining (yamux
	// writes frames in the order they are sent), so the agent waits for
	// it; none opens after, when the agent may already have closed.
	openMu   sync.RWMutex
	retiring atomic.Bool // asked to go away as its stream ids run out
	// retireCut cuts a retired connection the agent keeps open; stopped
	// when the connection ends first, so that it is not held until then.
	retireCut atomic.Pointer[time.Timer]
	connGauge prometheus.Gauge // its tunnel's ferry_relay_agent_connections

	ctrlMu sync.Mutex
	ctrl   *yamux.Stream
}

// add puts c, which join let in, into the tunnel. Its place moves from
// joining to conns in one step: counted twice for a moment, a tunnel one
// short of its limit would refuse a connection it has room for.
func (t *tunnel) add(c *agentConn) {
	t.mu.Lock()
	t.conns = append(t.conns, c)
	t.joining--
	t.mu.Unlock()
}

// addUnlessSameAgent adds c, as add does, unless a live connection of the
// same agent is already here (the check and the add are one step, so two
// connections of one agent arriving together cannot both pass). It
// reports whether c was added; if not, the caller still holds its place
// from join.
func (t *tunnel) addUnlessSameAgent(c *agentConn) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, x := range t.conns {
		if x.agentID == c.agentID && !x.draining.Load() && !x.sess.IsClosed() {
			return false
		}
	}
	t.conns = append(t.conns, c)
	t.joining--
	return true
}

// held reports whether any connection that takes requests is here.
func (t *tunnel) held() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.conns {
		if !c.draining.Load() && !c.sess.IsClosed() {
			return true
		}
	}
	return false
}

// join reserves a place for an agent connection being set up, unless
// the tunnel holds limit already (set up or being set up); held is that
// number. add hands the place to the connection; a caller whose
// connection failed before that calls joined.
func (t *tunnel) join(limit int) (held int, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	held = len(t.conns) + t.joining
	if held >= limit {
		return held, false
	}
	t.joining++
	return held, true
}

func (t *tunnel) joined() {
	t.mu.Lock()
	t.joining--
	t.mu.Unlock()
}

func (t *tunnel) remove(c *agentConn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	// slices.Delete clears the vacated end of the array: a copy left
	// there would keep a closed connection (its session, its buffers:
	// megabytes after a download) for as long as the tunnel has fewer
	// connections than before.
	if i := slices.Index(t.conns, c); i >= 0 {
		t.conns = slices.Delete(t.conns, i, i+1)
	}
}

// pick returns the live connection with the fewest streams in flight,
// skipping except (a connection that just failed), or nil if none.
func (t *tunnel) pick(except *agentConn) *agentConn {
	t.mu.Lock()
	defer t.mu.Unlock()
	var best *agentConn
	for _, c := range t.conns {
		if c == except || c.draining.Load() || c.sess.IsClosed() {
			continue
		}
		if best == nil || c.inflight.Load() < best.inflight.Load() {
			best = c
		}
	}
	return best
}

// snapshot copies the connection list for reporting and shutdown.
func (t *tunnel) snapshot() []*agentConn {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]*agentConn(nil), t.conns...)
}

// serves reports whether the agent announced this upstream.
func (c *agentConn) serves(upstream string) bool {
	_, ok := slices.BinarySearch(*c.upstreams.Load(), upstream)
	return ok
}

// upstreamNames lists the announced upstreams, sorted. The slice is
// shared: callers read it only.
func (c *agentConn) upstreamNames() []string { return *c.upstreams.Load() }

// goAway tells the agent to reconnect elsewhere; this connection gets no
// new streams, and those in flight finish on it.
func (c *agentConn) goAway(reason string) {
	c.drain()
	c.send(proto.Message{Type: proto.MsgGoAway, Reason: reason})
}

// drain sends no new requests to this connection: it is no longer
// picked, and its idle keep-alive streams are closed (the agent waits for
// its streams to close before it lets the connection go).
func (c *agentConn) drain() {
	c.openMu.Lock()
	c.draining.Store(true)
	c.openMu.Unlock()
	c.pool.close()
}

// errDraining: a stream was asked of a connection that drains.
var errDraining = errors.New("the agent connection is draining")

// openStream opens a stream for a request unless c drains.
func (c *agentConn) openStream() (*yamux.Stream, error) {
	c.openMu.RLock()
	defer c.openMu.RUnlock()
	if c.draining.Load() {
		return nil, errDraining
	}
	return c.sess.OpenStream()
}

// send writes a control message to the agent.
func (c *agentConn) send(m proto.Message) {
	c.ctrlMu.Lock()
	defer c.ctrlMu.Unlock()
	if c.ctrl != nil {
		c.ctrl.SetWriteDeadline(time.Now().Add(2 * time.Second))
		proto.WriteMessage(c.ctrl, m)
		c.ctrl.SetWriteDeadline(time.Time{})
	}
}
