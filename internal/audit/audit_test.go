package audit

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestRotationKeepsWholeLines(t *testing.T) {
	p := filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(Options{Path: p, MaxBytes: 2000, Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 50; i++ {
				l.Record(Entry{RequestID: fmt.Sprintf("g%d-%d", g, i), Method: "GET", Path: "/rest/api/1.0/projects", Decision: "allow", Status: 200})
			}
		}()
	}
	wg.Wait()
	l.Close()
	total := 0
	for _, f := range []string{p, p + ".1", p + ".2"} {
		st, err := os.Stat(f)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if st.Size() > 2000 {
			t.Errorf("%s is %d bytes, over the limit", f, st.Size())
		}
		fh, _ := os.Open(f)
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			var e Entry
			if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
				t.Fatalf("%s: torn line %q", f, sc.Text())
			}
			total++
		}
		fh.Close()
	}
	if _, err := os.Stat(p + ".3"); err == nil {
		t.Error("kept more rotated files than asked")
	}
	if total == 0 || total >= 200 {
		t.Fatalf("%d lines kept across files; rotation should have dropped the oldest", total)
	}
}

func TestNilLogRecordsNothing(t *testing.T) {
	l, err := Open(Options{})
	if err != nil || l != nil {
		t.Fatal(l, err)
	}
	if err := l.Record(Entry{}); err != nil {
		t.Fatal(err)
	}
}

// openTemp opens a log at audit.jsonl in a new directory, with o's
// limits.
func openTemp(t *testing.T, o Options) (*Log, string) {
	t.Helper()
	o.Path = filepath.Join(t.TempDir(), "audit.jsonl")
	l, err := Open(o)
	if err != nil {
		t.Fatal(err)
	}
	return l, o.Path
}

// readLines returns a file's lines; bad holds those that are not entries.
func readLines(t *testing.T, p string) (ids []string, bad []string) {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > 0 && b[len(b)-1] != '\n' {
		t.Fatalf("%s does not end in a whole line: %q", p, b)
	}
	for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
		var e Entry
		if line == "" || json.Unmarshal([]byte(line), &e) != nil {
			bad = append(bad, line)
			continue
		}
		ids = append(ids, e.RequestID)
	}
	return ids, bad
}

// cutWriter writes the first half of the next fail writes, then fails
// them, as a disk that fills up mid-line does.
type cutWriter struct {
	w    io.Writer
	fail int
}

func (c *cutWriter) Write(b []byte) (int, error) {
	if c.fail == 0 {
		return c.w.Write(b)
	}
	c.fail--
	n, _ := c.w.Write(b[:len(b)/2])
	return n, syscall.ENOSPC
}

func TestWriteErrorTakesBackThePartLine(t *testing.T) {
	l, p := openTemp(t, Options{})
	defer l.Close()
	l.Record(Entry{RequestID: "before"})
	l.w = &cutWriter{w: l.f, fail: 1}
	if err := l.Record(Entry{RequestID: "cut"}); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("a failed write returned %v", err)
	}
	if err := l.Record(Entry{RequestID: "after"}); err != nil {
		t.Fatal(err)
	}
	ids, bad := readLines(t, p)
	if fmt.Sprint(ids) != "[before after]" || len(bad) != 0 {
		t.Fatalf("log holds %v and unreadable lines %q; want the cut line taken back", ids, bad)
	}
	st := l.State()
	if st.Written != 2 || st.Lost != 1 || !strings.Contains(st.LastError, "no space left") || st.LastErrorAt.IsZero() {
		t.Fatalf("state %+v", st)
	}
}

// When the part line cannot be taken back, the next line still starts
// on a line of its own.
func TestPartLineThatStaysEndsBeforeTheNext(t *testing.T) {
	l, p := openTemp(t, Options{})
	defer l.Close()
	l.Record(Entry{RequestID: "before"})
	w := l.f
	ro, err := os.Open(p) // truncating a read-only handle fails
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	l.f, l.w = ro, &cutWriter{w: w, fail: 1}
	l.Record(Entry{RequestID: "cut"})
	l.w = w
	if err := l.Record(Entry{RequestID: "after"}); err != nil {
		t.Fatal(err)
	}
	ids, bad := readLines(t, p)
	if fmt.Sprint(ids) != "[before after]" || len(bad) != 1 || !strings.HasPrefix(bad[0], `{"time"`) {
		t.Fatalf("log holds %v and unreadable lines %q; want the part line alone on its line", ids, bad)
	}
}

// A rotation that cannot open the new file loses the line it was for, but
// does not shift the kept files again for every line after it.
func TestFailedOpenAfterRotationShiftsOnce(t *testing.T) {
	l, p := openTemp(t, Options{MaxBytes: 400, Keep: 3})
	defer l.Close()
	for i := range 2 {
		l.Record(Entry{RequestID: fmt.Sprint("first-", i)})
	}
	failing := 3
	open := l.openFile
	l.openFile = func(name string) (*os.File, error) {
		if failing > 0 {
			failing--
			return nil, syscall.EMFILE
		}
		return open(name)
	}
	for i := range 4 {
		err := l.Record(Entry{RequestID: fmt.Sprint("next-", i)})
		if (i < 3) != (err != nil) {
			t.Fatalf("line %d: %v", i, err)
		}
	}
	if ids, _ := readLines(t, p+".1"); fmt.Sprint(ids) != "[first-0 first-1]" {
		t.Fatalf("%s.1 holds %v", p, ids)
	}
	if ids, _ := readLines(t, p); fmt.Sprint(ids) != "[next-3]" {
		t.Fatalf("%s holds %v", p, ids)
	}
	if _, err := os.Stat(p + ".2"); err == nil {
		t.Fatal("the kept files were shifted more than once")
	}
	if st := l.State(); st.Lost != 3 || !strings.Contains(st.LastError, "too many open files") {
		t.Fatalf("state %+v", st)
	}
}

// A rotation that cannot move the file aside keeps writing to it, past
// the limit, and tries again later.
func TestFailedRotationKeepsWriting(t *testing.T) {
	l, p := openTemp(t, Options{MaxBytes: 400, Keep: 3})
	defer l.Close()
	l.Record(Entry{RequestID: "a"})
	l.Record(Entry{RequestID: "b"})
	l.moveAside = func(string, string) error { return syscall.EROFS }
	for _, id := range []string{"c", "d"} {
		if err := l.Record(Entry{RequestID: id}); err != nil {
			t.Fatalf("line %s lost to a failed rotation: %v", id, err)
		}
	}
	if ids, _ := readLines(t, p); fmt.Sprint(ids) != "[a b c d]" {
		t.Fatalf("%s holds %v", p, ids)
	}
	if st := l.State(); st.Lost != 0 || !strings.Contains(st.LastError, "rotate audit log") {
		t.Fatalf("state %+v", st)
	}
	l.moveAside = os.Rename
	l.rotateAfter = time.Time{}
	l.Record(Entry{RequestID: "e"})
	if ids, _ := readLines(t, p+".1"); fmt.Sprint(ids) != "[a b c d]" {
		t.Fatalf("%s.1 holds %v after the retried rotation", p, ids)
	}
	if ids, _ := readLines(t, p); fmt.Sprint(ids) != "[e]" {
		t.Fatalf("%s holds %v", p, ids)
	}
	if left, _ := filepath.Glob(p + ".rotating-*"); len(left) != 0 {
		t.Fatalf("rotation left %v behind", left)
	}
}

func TestReopenFollowsAMovedFile(t *testing.T) {
	l, p := openTemp(t, Options{})
	l.Record(Entry{RequestID: "old"})
	if err := os.Rename(p, p+".moved"); err != nil {
		t.Fatal(err)
	}
	if err := l.Reopen(); err != nil {
		t.Fatal(err)
	}
	l.Record(Entry{RequestID: "new"})
	l.Close()
	if ids, _ := readLines(t, p+".moved"); fmt.Sprint(ids) != "[old]" {
		t.Fatalf("moved file holds %v", ids)
	}
	if ids, _ := readLines(t, p); fmt.Sprint(ids) != "[new]" {
		t.Fatalf("reopened file holds %v", ids)
	}
	if err := l.Record(Entry{RequestID: "late"}); err == nil {
		t.Fatal("a closed log took a line")
	}
	if ids, _ := readLines(t, p); fmt.Sprint(ids) != "[new]" {
		t.Fatalf("a closed log wrote: %v", ids)
	}
}

// A character device (/dev/null for no audit trail, say) takes the lines
// and is never rotated: rotating renames, and a device node is not the
// log's to move.
func TestDeviceIsWrittenNeverRotated(t *testing.T) {
	l, err := Open(Options{Path: os.DevNull, MaxBytes: 1, Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	var moves []string
	l.moveAside = func(from, to string) error {
		moves = append(moves, from)
		return syscall.EPERM // never really move a device node
	}
	for i := range 3 {
		if err := l.Record(Entry{RequestID: fmt.Sprint("r", i)}); err != nil {
			t.Fatalf("line %d to %s: %v", i, os.DevNull, err)
		}
	}
	if len(moves) != 0 {
		t.Fatalf("tried to rotate %v", moves)
	}
	if s := l.State(); s.Written != 3 || s.Lost != 0 {
		t.Fatalf("state: %+v", s)
	}
}

// A path that became a named pipe (or a device) is not opened on reopen:
// opening a pipe would wait for a reader, holding every request's audit
// line, and rotation would rename it. The line is refused with an error
// saying why, and the pipe stays where it was.
func TestReopenRefusesWhatIsNotAFile(t *testing.T) {
	l, p := openTemp(t, Options{MaxBytes: 1})
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	err := l.Reopen()
	if err == nil || !strings.Contains(err.Error(), p+" is a named pipe, not a regular file") {
		t.Fatalf("Reopen onto a pipe: %v", err)
	}
	if err := l.Record(Entry{RequestID: "r1"}); err == nil || !strings.Contains(err.Error(), "named pipe") {
		t.Fatalf("Record with the path a pipe: %v", err)
	}
	if st, err := os.Stat(p); err != nil || st.Mode()&os.ModeNamedPipe == 0 {
		t.Fatalf("the pipe was moved or replaced: %v %v", st, err)
	}
	if s := l.State(); s.Lost == 0 {
		t.Fatalf("the refused line is not counted as lost: %+v", s)
	}
	l.Close()
}

// Reconfigure (a reload) moves the log to a new path, or changes how it
// rotates; a path that cannot be opened changes nothing.
func TestReconfigure(t *testing.T) {
	l, p := openTemp(t, Options{})
	defer l.Close()
	l.Record(Entry{RequestID: "a"})
	missing := filepath.Join(t.TempDir(), "no-such-dir", "audit.jsonl")
	if err := l.Reconfigure(Options{Path: missing}); err == nil {
		t.Fatal("moved to a path that cannot be opened")
	}
	l.Record(Entry{RequestID: "b"})
	if ids, _ := readLines(t, p); fmt.Sprint(ids) != "[a b]" {
		t.Fatalf("after the refused move %s holds %v", p, ids)
	}
	next := filepath.Join(t.TempDir(), "moved.jsonl")
	if err := l.Reconfigure(Options{Path: next, MaxBytes: 200, Keep: 1}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"c", "d", "e"} {
		if err := l.Record(Entry{RequestID: id}); err != nil {
			t.Fatal(err)
		}
	}
	if ids, _ := readLines(t, p); fmt.Sprint(ids) != "[a b]" {
		t.Fatalf("after the move the old file holds %v", ids)
	}
	// An entry is over 100 bytes: each past the first rotates.
	if ids, _ := readLines(t, next); fmt.Sprint(ids) != "[e]" {
		t.Fatalf("%s holds %v", next, ids)
	}
	if ids, _ := readLines(t, next+".1"); fmt.Sprint(ids) != "[d]" {
		t.Fatalf("%s.1 holds %v", next, ids)
	}
	if _, err := os.Stat(next + ".2"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("max_files 1 kept %s.2: %v", next, err)
	}
	if st := l.State(); st.Path != next || st.Written != 5 || st.Lost != 0 {
		t.Fatalf("state after the move: %+v", st)
	}
	if err := l.Reconfigure(Options{}); err == nil {
		t.Fatal("a reload turned the audit log off")
	}
}
