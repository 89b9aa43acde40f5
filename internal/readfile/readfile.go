// Package readfile reads the files a config names (credentials, CA
// bundles, certificates, the config itself) with a bound on their size.
// A path pointed at the wrong thing then fails at once with an error that
// says what it is, instead of filling the daemon's memory (/dev/zero, a
// disk image, a log) or hanging it (a named pipe nobody writes to).
package readfile

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
)

// ErrTooLarge is wrapped by the error for a file over its bound.
var ErrTooLarge = errors.New("file too large")

// Regular reads the regular file at path (a symlink to one is followed),
// at most limit bytes. Anything else, a directory, a device or a named
// pipe, is refused without reading it: these files are read again when
// they change, which only a regular file can be.
func Regular(path string, limit int64) ([]byte, error) {
	// Judged before opening: opening a device may do something (a tape
	// rewinds), and opening a named pipe waits for a writer.
	if st, err := os.Stat(path); err == nil {
		if err := NotRegular(st.Mode()); err != nil {
			return nil, &fs.PathError{Op: "read", Path: path, Err: err}
		}
	}
	// And again once open, in case the path changed in between:
	// non-blocking, so that a pipe put there meanwhile is refused rather
	// than waited on. A regular file's reads ignore the flag.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if err := NotRegular(st.Mode()); err != nil {
		return nil, &fs.PathError{Op: "read", Path: path, Err: err}
	}
	return readAtMost(f, path, limit)
}

// Limited reads the file at path, at most limit bytes, whatever its kind:
// a config may come from a pipe (--config /dev/stdin). A directory is
// refused by the read itself.
func Limited(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return readAtMost(f, path, limit)
}

func readAtMost(r io.Reader, path string, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, &fs.PathError{Op: "read", Path: path, Err: fmt.Errorf("%w: more than %s", ErrTooLarge, size(limit))}
	}
	return b, nil
}

// NotRegular says what a file of mode m is when it is not a regular file,
// for an error; nil for a regular file.
func NotRegular(m fs.FileMode) error {
	var kind string
	switch {
	case m.IsRegular():
		return nil
	case m.IsDir():
		kind = "a directory"
	case m&fs.ModeNamedPipe != 0:
		kind = "a named pipe"
	case m&fs.ModeCharDevice != 0:
		kind = "a character device"
	case m&fs.ModeDevice != 0:
		kind = "a device"
	case m&fs.ModeSocket != 0:
		kind = "a socket"
	default:
		return errors.New("is not a regular file")
	}
	return fmt.Errorf("is %s, not a regular file", kind)
}

func size(n int64) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%d KiB", n>>10)
	}
	return fmt.Sprintf("%d bytes", n)
}
