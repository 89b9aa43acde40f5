// Package audit writes the agent's decision log: one JSON line per request
// it judged. It records who asked for what and what happened, never a
// credential, a query string or a body.
package audit

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync"
	"time"

	"github.com/ferry-tunnel/ferry/internal/readfile"
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

// State is what the log reports of itself since it was opened.
type State struct {
	Path        string    `json:"path"`
	Written     int64     `json:"written"` // lines written
	Lost        int64     `json:"lost"`    // lines a write error kept out of the log
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// rotateRetry is how long a failed rotation waits before it is tried
// again; meanwhile lines go on being appended past the size limit.
const rotateRetry = time.Minute

// Log appends entries. A nil *Log records nothing.
type Log struct {
	opts Options
	// openFile is os.OpenFile's append-and-create, moveAside the rename
	// that starts a rotation; tests make them fail.
	openFile  func(name string) (*os.File, error)
	moveAside func(from, to string) error

	mu          sync.Mutex
	w           io.Writer // nil while the file could not be opened: tried again at the next line
	f           *os.File  // nil for stdout
	size        int64
	rotatable   bool      // a regular file: rotated by size (not a device, nor stdout)
	torn        bool      // the file ends in part of a line that could not be taken back
	rotateAfter time.Time // a failed rotation is not tried again before then
	closed      bool
	state       State
}

// Open opens (creating, appending) the audit destination; an empty path
// gives a nil Log.
func Open(o Options) (*Log, error) {
	if o.Path == "" {
		return nil, nil
	}
	l := &Log{opts: o, state: State{Path: o.Path}, moveAside: os.Rename, openFile: func(name string) (*os.File, error) {
		return os.OpenFile(name, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	}}
	if o.Path == "-" {
		l.w = os.Stdout
		return l, nil
	}
	if err := l.open(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *Log) open() error {
	f, size, rotatable, err := l.openAt(l.opts.Path)
	if err != nil {
		return err
	}
	l.f, l.w, l.size, l.rotatable, l.torn = f, f, size, rotatable, false
	return nil
}

// CheckPath says why path cannot take the audit log; nil if it can: a
// regular file (or none yet), or a character device such as /dev/null,
// which is written to but never rotated (rotation renames the file). A
// named pipe would hold the opening until it had a reader, and with it
// every request's line; a directory, a socket or a block device is no
// log.
func CheckPath(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return nil // opening creates it, or says why it cannot
	}
	if m := st.Mode(); !m.IsRegular() && m&fs.ModeCharDevice == 0 {
		return fmt.Errorf("%s %w", path, readfile.NotRegular(m))
	}
	return nil
}

// openAt opens path for appending and says how large it is, and whether
// it is a file that rotates (not a device).
func (l *Log) openAt(path string) (f *os.File, size int64, rotatable bool, err error) {
	if err := CheckPath(path); err != nil {
		return nil, 0, false, fmt.Errorf("open audit log: %w", err)
	}
	f, err = l.openFile(path)
	if err != nil {
		return nil, 0, false, fmt.Errorf("open audit log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, 0, false, fmt.Errorf("open audit log: %w", err)
	}
	return f, st.Size(), st.Mode().IsRegular(), nil
}

// Reconfigure puts o in force (a config reload). A new path is opened
// before the current file is closed, so that one that cannot be opened
// changes nothing and says why. The counts in State carry over.
func (l *Log) Reconfigure(o Options) error {
	if l == nil || o.Path == "" {
		return errors.New("the audit log cannot be turned on or off without a restart")
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return errors.New("audit log closed")
	}
	if o.Path != l.opts.Path {
		var f *os.File
		var w io.Writer = os.Stdout
		var size int64
		var rotatable bool
		if o.Path != "-" {
			var err error
			if f, size, rotatable, err = l.openAt(o.Path); err != nil {
				return err
			}
			w = f
		}
		if l.f != nil {
			l.f.Close()
		}
		l.f, l.w, l.size, l.rotatable, l.torn, l.rotateAfter = f, w, size, rotatable, false, time.Time{}
		l.state.Path = o.Path
	}
	l.opts = o
	return nil
}

// Record writes one entry as one line in one write, so concurrent
// writers (and a crash) never interleave partial lines. A line a write
// error cut short is taken back, so the next one starts on a line of
// its own; the error is returned and kept in State.
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
	if err := l.write(b); err != nil {
		l.state.Lost++
		l.noteError(err)
		return err
	}
	l.state.Written++
	return nil
}

func (l *Log) noteError(err error) {
	l.state.LastError, l.state.LastErrorAt = err.Error(), time.Now()
}

func (l *Log) write(b []byte) error {
	if l.closed {
		return errors.New("audit log closed")
	}
	if l.w == nil {
		// A rotation or reopen could not open the file; try again now,
		// without rotating again (that would shift the kept files once
		// more for every line).
		if err := l.open(); err != nil {
			return err
		}
	}
	if l.f != nil && l.rotatable && l.opts.MaxBytes > 0 && l.size > 0 && l.size+int64(len(b)) > l.opts.MaxBytes && !time.Now().Before(l.rotateAfter) {
		if err := l.rotate(); err != nil {
			// Nothing was lost: the line goes on the current file, past
			// the limit, and rotation waits a while.
			l.rotateAfter = time.Now().Add(rotateRetry)
			l.noteError(err)
			if l.w == nil {
				return err
			}
		}
	}
	if l.torn {
		b = append([]byte{'\n'}, b...)
	}
	n, err := l.w.Write(b)
	if err == nil && n < len(b) {
		err = io.ErrShortWrite
	}
	if err != nil {
		if n > 0 && l.f != nil {
			if l.f.Truncate(l.size) == nil {
				n = 0
			} else {
				l.torn = !(n > 0 && b[n-1] == '\n')
			}
		}
		l.size += int64(n)
		return fmt.Errorf("write audit log %s: %w", l.opts.Path, err)
	}
	l.size += int64(n)
	l.torn = false
	return nil
}

// rotate shifts path.(N-1) → path.N … path → path.1 and opens a new
// path. The current file is moved aside first: if that fails, nothing has
// been shifted and the current file stays open. The name it is moved to
// is new each time, so a file left there by a crash mid-rotation is never
// overwritten.
func (l *Log) rotate() error {
	p := l.opts.Path
	aside := fmt.Sprintf("%s.rotating-%d", p, time.Now().UnixNano())
	if err := l.moveAside(p, aside); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rotate audit log: %w", err)
	}
	l.f.Close()
	l.f, l.w = nil, nil
	keep := max(l.opts.Keep, 1)
	os.Remove(fmt.Sprintf("%s.%d", p, keep))
	for i := keep - 1; i >= 1; i-- {
		os.Rename(fmt.Sprintf("%s.%d", p, i), fmt.Sprintf("%s.%d", p, i+1))
	}
	if err := os.Rename(aside, p+".1"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rotate audit log: %w", err)
	}
	return l.open()
}

// Reopen closes the file and opens path again: after the file was moved
// or deleted from outside (logrotate without copytruncate), lines go to
// a new file at path instead of the old inode.
func (l *Log) Reopen() error {
	if l == nil || l.opts.Path == "-" {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	if l.f != nil {
		l.f.Close()
		l.f, l.w = nil, nil
	}
	if err := l.open(); err != nil {
		l.noteError(err)
		return err
	}
	return nil
}

// State reports the lines written and lost, and the last error.
func (l *Log) State() State {
	if l == nil {
		return State{}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.state
}

// Close closes the file.
func (l *Log) Close() error {
	if l == nil {
		return nil
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.closed = true
	if l.f == nil {
		return nil
	}
	err := l.f.Close()
	l.f, l.w = nil, nil
	return err
}
