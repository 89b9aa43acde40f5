// Package audit writes the agent's decision log: one JSON line per request
// it judged. It records who asked for what and what happened, never a
// credential, a query string or a body.
package audit

import (
	"encoding/json"
	"fmt"
	"io"
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

// Options say where entries go.
type Options struct {
	// Path of the file; "-" writes to standard output (for journald).
	Path string
	// MaxBytes rotates the file when a write would pass it; 0: never.
	MaxBytes int64
	// Keep is how many rotated files (path.1 … path.N) are kept.
	Keep int
}

// Log appends entries. A nil *Log records nothing.
type Log struct {
	opts Options

	mu   sync.Mutex
	w    io.Writer
	f    *os.File // nil for stdout
	size int64
}

// Open opens (creating, appending) the audit destination; an empty path
// gives a nil Log.
func Open(o Options) (*Log, error) {
	if o.Path == "" {
		return nil, nil
	}
	if o.Path == "-" {
		return &Log{opts: o, w: os.Stdout}, nil
	}
	l := &Log{opts: o}
	if err := l.open(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *Log) open() error {
	f, err := os.OpenFile(l.opts.Path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return fmt.Errorf("open audit log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("open audit log: %w", err)
	}
	l.f, l.w, l.size = f, f, st.Size()
	return nil
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
	b = append(b, '\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.f != nil && l.opts.MaxBytes > 0 && l.size > 0 && l.size+int64(len(b)) > l.opts.MaxBytes {
		if err := l.rotate(); err != nil {
			return err
		}
	}
	n, err := l.w.Write(b)
	l.size += int64(n)
	if err != nil {
		return fmt.Errorf("write audit log: %w", err)
	}
	return nil
}

// rotate shifts path.(N-1) → path.N … path → path.1 and reopens path.
func (l *Log) rotate() error {
	l.f.Close()
	p := l.opts.Path
	keep := max(l.opts.Keep, 1)
	os.Remove(fmt.Sprintf("%s.%d", p, keep))
	for i := keep - 1; i >= 1; i-- {
		os.Rename(fmt.Sprintf("%s.%d", p, i), fmt.Sprintf("%s.%d", p, i+1))
	}
	if err := os.Rename(p, p+".1"); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("rotate audit log: %w", err)
	}
	return l.open()
}

// Close closes the file.
func (l *Log) Close() error {
	if l == nil || l.f == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}
