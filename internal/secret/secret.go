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

	mu      sync.Mutex
	val     string
	mod     time.Time
	size    int64
	checked time.Time
}

const checkEvery = time.Second

// maxSecret bounds a secret file: a token is a few hundred bytes at most,
// and a wrongly pointed path (a log file) must not be read whole.
const maxSecret = 64 << 10

// NewFile reads path once, so a missing or empty file fails at start-up.
func NewFile(path string) (*File, error) {
	f := &File{path: path}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, err := f.reloadLocked(); err != nil {
		return nil, err
	}
	return f, nil
}

func (f *File) String() string { return "file " + f.path }

// Value implements Source.
func (f *File) Value() (string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if time.Since(f.checked) < checkEvery {
		return f.val, nil
	}
	return f.reloadLocked()
}

func (f *File) reloadLocked() (string, error) {
	f.checked = time.Now()
	st, err := os.Stat(f.path)
	if err != nil {
		return "", f.fail(err)
	}
	if st.ModTime().Equal(f.mod) && st.Size() == f.size && f.val != "" {
		return f.val, nil
	}
	if st.Size() > maxSecret {
		return "", f.fail(fmt.Errorf("%d bytes is too large for a credential", st.Size()))
	}
	b, err := os.ReadFile(f.path)
	if err != nil {
		return "", f.fail(err)
	}
	v := strings.TrimSpace(string(b))
	if v == "" {
		return "", f.fail(errors.New("file is empty"))
	}
	if strings.ContainsAny(v, "\r\n") {
		return "", f.fail(errors.New("more than one line"))
	}
	f.val, f.mod, f.size = v, st.ModTime(), st.Size()
	return v, nil
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
