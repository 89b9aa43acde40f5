// Package audit writes the agent's decision log: one JSON line per request
// it judged. It records who asked for what and what happened, never a
// credential, a query string or a body.
package audit

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"time"
)

// Entry is one decision.
type Entry struct {
	Time       time.Time `json:"time"`
	RequestID  string    `json:"request_id"`
	Scanner    string    `json:"scanner"`
	Upstream   string    `json:"upstream"`
	Method     string    `json:"method"`
	Path       string    `json:"path"` // normalised when normalisation succeeded
	Rule       string    `json:"rule"`
	Decision   string    `json:"decision"` // allow or deny
	Status     int       `json:"status"`
	Bytes      int64     `json:"bytes"`
	DurationMS int64     `json:"duration_ms"`
}

// Log appends entries to a file. A nil *Log records nothing.
type Log struct {
	mu sync.Mutex
	f  *os.File
}

// Open opens (creating, appending) the audit file; path "" gives nil.
func Open(path string) (*Log, error) {
	if path == "" {
		return nil, nil
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open audit log: %w", err)
	}
	return &Log{f: f}, nil
}

// Record writes one entry as one line in one write, so concurrent
// writers (and a crash) never interleave partial lines.
func (l *Log) Record(e Entry) error {
	if l == nil {
		return nil
	}
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, err := l.f.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write audit log: %w", err)
	}
	return nil
}

// Close closes the file.
func (l *Log) Close() error {
	if l == nil {
		return nil
	}
	return l.f.Close()
}
