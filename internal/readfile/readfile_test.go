package readfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestRegularReadsWithinItsBound(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "token")
	if err := os.WriteFile(p, []byte("fry_secret\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, err := Regular(p, 11)
	if err != nil || string(b) != "fry_secret\n" {
		t.Fatalf("Regular = %q, %v; want the file's bytes", b, err)
	}
	// Through a symlink, as Kubernetes mounts secrets.
	link := filepath.Join(dir, "link")
	if err := os.Symlink(p, link); err != nil {
		t.Fatal(err)
	}
	if b, err := Regular(link, 64); err != nil || string(b) != "fry_secret\n" {
		t.Fatalf("Regular(symlink) = %q, %v", b, err)
	}

	_, err = Regular(p, 10)
	if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "more than 10 bytes") {
		t.Fatalf("Regular over the bound: %v; want ErrTooLarge naming the file and the bound", err)
	}
	if _, err := Regular(filepath.Join(dir, "missing"), 10); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file: %v", err)
	}
}

// Each kind of wrong path is refused at once, saying what it is, without
// reading it: /dev/zero would fill the memory, a named pipe would hang.
func TestRegularRefusesWhatIsNotAFile(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct{ path, want string }{
		{"/dev/zero", "is a character device, not a regular file"},
		{fifo, "is a named pipe, not a regular file"},
		{dir, "is a directory, not a regular file"},
	} {
		done := make(chan error, 1)
		go func() {
			_, err := Regular(c.path, 1<<20)
			done <- err
		}()
		select {
		case err := <-done:
			if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), c.path) {
				t.Errorf("Regular(%s) = %v; want an error naming it and saying %q", c.path, err, c.want)
			}
		case <-time.After(10 * time.Second):
			// A hang, not a slow machine: the read should not wait at all.
			t.Fatalf("Regular(%s) still waiting after 10 s", c.path)
		}
	}
}

func TestLimitedReadsPipesButStopsAtItsBound(t *testing.T) {
	b, err := Limited("/dev/zero", 1<<10)
	if !errors.Is(err, ErrTooLarge) || b != nil || !strings.Contains(err.Error(), "more than 1 KiB") {
		t.Fatalf("Limited(/dev/zero) = %d bytes, %v; want ErrTooLarge", len(b), err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	go func() {
		w.Write([]byte("agent_listen: \":443\"\n"))
		w.Close()
	}()
	b, err = Limited("/dev/fd/"+strconv.Itoa(int(r.Fd())), 1<<10)
	if err != nil || string(b) != "agent_listen: \":443\"\n" {
		t.Fatalf("Limited(pipe) = %q, %v; want what was written", b, err)
	}
	if _, err := Limited(t.TempDir(), 1<<10); err == nil {
		t.Fatal("Limited(directory): no error")
	}
}

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }
