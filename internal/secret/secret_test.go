package secret

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestFileRereadsOnChange(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tok")
	os.WriteFile(p, []byte("first\n"), 0o600)
	f, err := NewFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := f.Value(); v != "first" {
		t.Fatalf("got %q", v)
	}
	os.WriteFile(p, []byte("second-longer\n"), 0o600)
	f.mu.Lock()
	f.checked = time.Time{} // as if checkEvery passed
	f.mu.Unlock()
	if v, _ := f.Value(); v != "second-longer" {
		t.Fatalf("after rotation got %q", v)
	}
	if strings.Contains(f.String(), "second") {
		t.Fatal("String leaks the value")
	}
}

func TestFileRejects(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{"empty": " \n", "two": "a\nb\n"} {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(body), 0o600)
		if _, err := NewFile(p); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
	if _, err := NewFile(filepath.Join(dir, "missing")); err == nil {
		t.Error("missing file accepted")
	}
}

// A rotation that leaves the path pointing at something that is not a
// file (a named pipe here) fails the secret at once: the re-read neither
// waits for a writer nor keeps the old value.
func TestFileReplacedByPipeFails(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tok")
	os.WriteFile(p, []byte("first\n"), 0o600)
	f, err := NewFile(p)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(p)
	if err := syscall.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	f.checked = time.Time{} // as if checkEvery passed
	f.mu.Unlock()
	v, err := f.Value()
	if err == nil || v != "" || !strings.Contains(err.Error(), "is a named pipe, not a regular file") || !strings.Contains(err.Error(), p) {
		t.Fatalf("Value after the file became a pipe = %q, %v; want an error naming the file and its kind", v, err)
	}
	if _, err := NewFile("/dev/zero"); err == nil || !strings.Contains(err.Error(), "character device") {
		t.Fatalf("NewFile(/dev/zero) = %v; want refused as a device", err)
	}
}

func TestEnv(t *testing.T) {
	t.Setenv("FERRY_TEST_SECRET", " v ")
	e, err := NewEnv("FERRY_TEST_SECRET")
	if err != nil {
		t.Fatal(err)
	}
	if v, _ := e.Value(); v != "v" {
		t.Fatalf("got %q", v)
	}
	if _, err := NewEnv("FERRY_TEST_UNSET_VARIABLE"); err == nil {
		t.Fatal("unset variable accepted")
	}
}

// A file of several secrets, for a rotation: the first is the one to
// send, all are there to accept; limits on count and length hold at the
// first read and at every re-read, and an error never carries a value.
func TestFileList(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "peer")
	opts := FileOptions{MaxLines: 2, MinLen: 8}
	os.WriteFile(p, []byte("new-secret-1\n\n  old-secret-0  \n"), 0o600)
	f, err := NewFileWith(p, opts)
	if err != nil {
		t.Fatal(err)
	}
	vs, _ := f.Values()
	if v, _ := f.Value(); v != "new-secret-1" || len(vs) != 2 || vs[1] != "old-secret-0" {
		t.Fatalf("Value %q, Values %q", v, vs)
	}

	// A rewrite that breaks the rules is an error until it is fixed.
	os.WriteFile(p, []byte("short\n"), 0o600)
	f.mu.Lock()
	f.checked = time.Time{}
	f.mu.Unlock()
	if _, err := f.Values(); err == nil || !strings.Contains(err.Error(), "line 1: 5 characters is too short, at least 8") || strings.Contains(err.Error(), "short\n") {
		t.Fatalf("short secret: %v", err)
	}
	// Until the file is fixed, not the last good value either.
	if v, err := f.Value(); err == nil || v != "" {
		t.Fatalf("second look at a broken file within checkEvery: %q, %v", v, err)
	}
	os.WriteFile(p, []byte("fixed-secret\n"), 0o600)
	f.mu.Lock()
	f.checked = time.Time{}
	f.mu.Unlock()
	if v, err := f.Value(); v != "fixed-secret" || err != nil {
		t.Fatalf("after the fix: %q, %v", v, err)
	}

	for name, body := range map[string]string{"three": "aaaaaaaa\nbbbbbbbb\ncccccccc\n", "empty": "\n \n", "short2": "aaaaaaaa\nsecret\n"} {
		q := filepath.Join(dir, name)
		os.WriteFile(q, []byte(body), 0o600)
		_, err := NewFileWith(q, opts)
		if err == nil {
			t.Errorf("%s accepted", name)
			continue
		}
		if strings.Contains(err.Error(), "secret\n") || strings.Contains(err.Error(), "aaaaaaaa") {
			t.Errorf("%s: error shows a value: %v", name, err)
		}
	}
	// One line is still one line without MaxLines.
	if _, err := NewFileWith(p, FileOptions{MinLen: 4}); err != nil {
		t.Errorf("single short-enough line: %v", err)
	}
}
