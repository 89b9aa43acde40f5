package proto

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
)

// Control message types.
const (
	MsgHello   = "hello"   // agent → relay, first message on the control stream
	MsgWelcome = "welcome" // relay → agent, the connection is registered
	MsgReject  = "reject"  // relay → agent, the hello was refused; the relay closes
	MsgGoAway  = "goaway"  // relay → agent, stop using this connection and reconnect
	// MsgUpstreams (agent → relay) replaces the upstream list the hello
	// gave, after the agent reloaded its config.
	MsgUpstreams = "upstreams"
	// MsgDraining (agent → relay): send no new streams on this connection;
	// the relay answers with the same type once it has stopped.
	MsgDraining = "draining"
)

// GoAwayRebalance is the goaway reason asking an agent connection to
// reconnect (through the load balancer) so that its connections spread
// over relay replicas.
const GoAwayRebalance = "rebalance: this replica already holds a connection of this agent"

// MaxRebalance: a hello whose Rebalanced is this or more is never asked
// to rebalance.
const MaxRebalance = 3

// GoAwayStreamIDs is the goaway reason for a connection whose stream ids
// (32 bits, never reused) are running out.
const GoAwayStreamIDs = "stream ids running out: open a fresh connection"

// MaxControlMessage bounds one control message.
const MaxControlMessage = 64 << 10

// Message is one control-stream message. Which fields are set depends on Type.
type Message struct {
	Type string `json:"type"`

	// hello
	AgentID      string   `json:"agent_id,omitempty"`
	Version      string   `json:"version,omitempty"`
	Upstreams    []string `json:"upstreams,omitempty"`
	Capabilities []string `json:"capabilities,omitempty"`
	// Rebalanced: how many times in a row this connection slot was just
	// asked to go away for GoAwayRebalance; the relay stops asking at
	// MaxRebalance.
	Rebalanced int `json:"rebalanced,omitempty"`
	// KeepaliveMS: the agent pings every this many milliseconds. A relay
	// then sends no pings of its own and cuts a connection that stays
	// silent for much longer. 0 (older agents): the relay pings.
	KeepaliveMS int64 `json:"keepalive_ms,omitempty"`

	// welcome
	RelayID      string `json:"relay_id,omitempty"`
	Tunnel       string `json:"tunnel,omitempty"`
	ConnectionID string `json:"connection_id,omitempty"`

	// reject, goaway
	Reason string `json:"reason,omitempty"`
}

// WriteMessage writes m as a 4-byte big-endian length and a JSON body.
func WriteMessage(w io.Writer, m Message) error {
	body, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode control message %q: %w", m.Type, err)
	}
	if len(body) > MaxControlMessage {
		return fmt.Errorf("encode control message %q: %d bytes, limit %d", m.Type, len(body), MaxControlMessage)
	}
	buf := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(body)), uint32(len(body)))
	if _, err := w.Write(append(buf, body...)); err != nil {
		return fmt.Errorf("write control message %q: %w", m.Type, err)
	}
	return nil
}

// ReadMessage reads one control message. It refuses oversize lengths before
// allocating, unknown JSON fields are ignored (newer peers), and a message
// without a type is malformed.
func ReadMessage(r io.Reader) (Message, error) {
	var l [4]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return Message{}, fmt.Errorf("read control message: %w", err)
	}
	n := binary.BigEndian.Uint32(l[:])
	if n > MaxControlMessage {
		return Message{}, fmt.Errorf("%w: control message of %d bytes exceeds %d", ErrMalformed, n, MaxControlMessage)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		return Message{}, fmt.Errorf("read control message body: %w", err)
	}
	var m Message
	if err := json.Unmarshal(body, &m); err != nil {
		return Message{}, fmt.Errorf("%w: control message: %v", ErrMalformed, err)
	}
	if m.Type == "" {
		return Message{}, fmt.Errorf("%w: control message without type", ErrMalformed)
	}
	return m, nil
}
