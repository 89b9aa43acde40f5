package config

import (
	"sync"
	"time"
)

// LoadState is what a daemon says of its config file in its status:
// when the running config was loaded, and the error of a reload refused
// since (the running config then stays in force).
type LoadState struct {
	File        string    `json:"file"`
	LoadedAt    time.Time `json:"loaded_at"`
	LastError   string    `json:"last_reload_error,omitempty"`
	LastErrorAt time.Time `json:"last_reload_error_at,omitzero"`
}

// Loads tracks a daemon's config loads for its status.
type Loads struct {
	mu sync.Mutex
	st LoadState
}

// NewLoads starts with file loaded now (at start).
func NewLoads(file string) *Loads {
	return &Loads{st: LoadState{File: file, LoadedAt: time.Now()}}
}

// Succeeded records a reload that took effect; an earlier failure is
// over.
func (l *Loads) Succeeded() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.st.LoadedAt, l.st.LastError, l.st.LastErrorAt = time.Now(), "", time.Time{}
}

// Failed records a reload refused.
func (l *Loads) Failed(err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.st.LastError, l.st.LastErrorAt = err.Error(), time.Now()
}

// State returns the current state.
func (l *Loads) State() LoadState {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.st
}
