// Package secret reads credentials from files or the environment. File
// secrets are re-read when the file changes, so a rotated token is picked up
// without a restart; values are trimmed of surrounding white space and
// never printed.
package secret

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/ferry-tunnel/ferry/internal/readfile"
)

// Source yields the current value of one secret.
type Source interface {
	// Value returns the secret, re-reading its file if it changed.
	Value() (string, error)
	// String describes where the secret comes from (never the value).
	String() string
}

// File is a secret kept in a file. It stats the file at most once per
// checkEvery and re-reads it when its size or modification time changed.
type File struct {
	path string
	opts FileOptions

	mu      sync.Mutex
	vals    []string // never modified in place: a reload replaces it
	err     error    // of the last look; a broken file is not used until fixed
	mod     time.Time
	size    int64
	checked time.Time
}

// FileOptions loosen or tighten what a secret file may hold.
type FileOptions struct {
	// MaxLines > 1 allows several secrets, one per line (blank lines
	// skipped), for a rotation: the first is the one to send, any is
	// one to accept. 0 or 1: exactly one line.
	MaxLines int
	// MinLen refuses a secret shorter than this many bytes.
	MinLen int
}

const checkEvery = time.Second

// maxSecret bounds a secret file: a token is a few hundred bytes at most,
// and a wrongly pointed path (a log file) must not be read whole.
const maxSecret = 64 << 10

// NewFile reads path once, so a missing or empty file fails at start-up.
func NewFile(path string) (*File, error) { return NewFileWith(path, FileOptions{}) }

// NewFileWith is NewFile with options.
func NewFileWith(path string, opts FileOptions) (*File, error) {
	f := &File{path: path, opts: opts}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.reloadLocked(); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *File) String() string { return "file " + f.path }

// Value implements Source. With several lines it is the first.
func (f *File) Value() (string, error) {
	vs, err := f.Values()
	if err != nil {
		return "", err
	}
	return vs[0], nil
}

// Values returns every secret the file holds, in file order (at least
// one). The caller must not modify the slice.
func (f *File) Values() ([]string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if time.Since(f.checked) < checkEvery {
		if f.err != nil {
			return nil, f.err
		}
		return f.vals, nil
	}
	vals, err := f.reloadLocked()
	if err != nil {
		// Until the file is fixed, every caller gets the error, not the
		// last good value: emptying or removing the file must stop its
		// use, and a half-written file should fail the same way each time.
		f.vals, f.mod, f.size = nil, time.Time{}, 0
	}
	f.err = err
	return vals, err
}

func (f *File) reloadLocked() ([]string, error) {
	f.checked = time.Now()
	st, err := os.Stat(f.path)
	if err != nil {
		return nil, f.fail(err)
	}
	if st.ModTime().Equal(f.mod) && st.Size() == f.size && f.vals != nil {
		return f.vals, nil
	}
	if st.Mode().IsRegular() && st.Size() > maxSecret {
		return nil, f.fail(fmt.Errorf("%d bytes is too large for a credential", st.Size()))
	}
	b, err := readfile.Regular(f.path, maxSecret)
	if err != nil {
		return nil, f.fail(err)
	}
	vals, err := f.parse(string(b))
	if err != nil {
		return nil, f.fail(err)
	}
	f.vals, f.mod, f.size = vals, st.ModTime(), st.Size()
	return vals, nil
}

func (f *File) parse(b string) ([]string, error) {
	b = strings.TrimSpace(b)
	if b == "" {
		return nil, errors.New("file is empty")
	}
	if f.opts.MaxLines <= 1 {
		if strings.ContainsAny(b, "\r\n") {
			return nil, errors.New("more than one line")
		}
		return f.checkLen([]string{b})
	}
	var vals []string
	for line := range strings.Lines(b) {
		if v := strings.TrimSpace(line); v != "" {
			vals = append(vals, v)
		}
	}
	if len(vals) > f.opts.MaxLines {
		return nil, fmt.Errorf("%d secrets, at most %d (one per line)", len(vals), f.opts.MaxLines)
	}
	return f.checkLen(vals)
}

func (f *File) checkLen(vals []string) ([]string, error) {
	for i, v := range vals {
		if len(v) < f.opts.MinLen {
			// Which line, never the value.
			return nil, fmt.Errorf("line %d: %d characters is too short, at least %d", i+1, len(v), f.opts.MinLen)
		}
	}
	return vals, nil
}

// fail wraps err with the file's path, once (os errors already carry it).
func (f *File) fail(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		err = pe.Err
	}
	return fmt.Errorf("secret file %s: %w", f.path, err)
}

// Env is a secret in an environment variable, read once.
type Env struct {
	name, val string
}

// NewEnv reads the variable now.
func NewEnv(name string) (*Env, error) {
	v := strings.TrimSpace(os.Getenv(name))
	if v == "" {
		return nil, errors.New("environment variable " + name + " is not set or empty")
	}
	return &Env{name: name, val: v}, nil
}

// Value implements Source.
func (e *Env) Value() (string, error) { return e.val, nil }
func (e *Env) String() string         { return "environment variable " + e.name }
