package agent

import (
	"slices"
	"sync"
	"sync/atomic"
)

// slotSet holds the agent's relay connection slots. While Serve runs,
// each slot has a goroutine (keepConnected) that keeps its connection up.
// A reload may add slots, which start at once, or retire the last ones,
// which drain: the relay is told to send them nothing more and they
// finish what they carry. Status, drain and webhooks read a snapshot.
type slotSet struct {
	list atomic.Pointer[[]*connState]

	mu     sync.Mutex
	run    func(*connState) // starts a slot's goroutine; nil outside Serve
	closed bool             // Serve is stopping: no slot starts any more
}

func newSlotSet(n int) *slotSet {
	s := &slotSet{}
	list := make([]*connState, n)
	for i := range list {
		list[i] = newConnState(i)
	}
	s.list.Store(&list)
	return s
}

func newConnState(slot int) *connState {
	return &connState{slot: slot, move: make(chan *moveReq, 1), retire: make(chan struct{})}
}

// all is the slots in force, in slot order.
func (s *slotSet) all() []*connState { return *s.list.Load() }

// start runs every slot with run, and from then on each slot resize adds.
func (s *slotSet) start(run func(*connState)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.run = run
	for _, st := range s.all() {
		run(st)
	}
}

// stop ends start: no slot goroutine starts after it returns, so that
// its owner can wait for those that did.
func (s *slotSet) stop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.run, s.closed = nil, true
}

// resize makes n slots. New ones start connecting at once; the last ones
// past n are retired (their goroutines drain them and return).
func (s *slotSet) resize(n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	cur := s.all()
	keep := min(n, len(cur))
	next := slices.Clone(cur[:keep])
	for i := len(cur); i < n; i++ {
		next = append(next, newConnState(i))
	}
	s.list.Store(&next)
	for _, st := range cur[keep:] {
		close(st.retire)
	}
	if s.run != nil {
		for _, st := range next[keep:] {
			s.run(st)
		}
	}
}
