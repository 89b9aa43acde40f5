package spool

import (
	"bytes"
	"errors"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

func delivery(body string) Delivery {
	return Delivery{ID: NewID(), Received: time.Now().UTC().Truncate(time.Millisecond), Repo: "PROJ/repo", Event: "repo:refs_changed",
		Header: http.Header{"X-Event-Key": {"repo:refs_changed"}}, Body: []byte(body)}
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	d := delivery(`{"eventKey":"repo:refs_changed"}` + "\n\x00binary")
	data, err := d.Encode()
	if err != nil {
		t.Fatal(err)
	}
	got, err := Decode(data)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != d.ID || got.Repo != d.Repo || !got.Received.Equal(d.Received) || !bytes.Equal(got.Body, d.Body) || got.Header.Get("X-Event-Key") != "repo:refs_changed" {
		t.Fatalf("round trip changed the delivery: %+v", got)
	}
}

func TestDecodeRejectsDamage(t *testing.T) {
	data, _ := delivery(`{"a":1}`).Encode()
	cases := map[string][]byte{
		"empty":       nil,
		"truncated":   data[:len(data)-2],
		"bit flipped": append(append([]byte{}, data[:len(data)-1]...), data[len(data)-1]^1),
		"no magic":    data[3:],
		"extra bytes": append(append([]byte{}, data...), 'x'),
	}
	for name, in := range cases {
		if _, err := Decode(in); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: got %v, want ErrCorrupt", name, err)
		}
	}
}

func TestPutOrderAndReopen(t *testing.T) {
	dir := t.TempDir()
	s, entries, err := Open(dir, Limits{MaxBytes: 1 << 20, MaxCount: 100}, quiet())
	if err != nil || len(entries) != 0 {
		t.Fatalf("open: %v, %d entries", err, len(entries))
	}
	var ids []string
	for i := range 5 {
		e, err := s.Put(delivery(strings.Repeat("x", i)))
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, e.ID)
	}
	_, entries, err = Open(dir, Limits{MaxBytes: 1 << 20, MaxCount: 100}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 5 {
		t.Fatalf("reopened spool has %d entries, want 5", len(entries))
	}
	for i, e := range entries {
		if e.ID != ids[i] {
			t.Fatalf("entry %d is %s, want %s (acceptance order lost)", i, e.ID, ids[i])
		}
	}
	// A new spool on the same directory continues the sequence.
	s2, _, _ := Open(dir, Limits{MaxBytes: 1 << 20, MaxCount: 100}, quiet())
	e, err := s2.Put(delivery("later"))
	if err != nil {
		t.Fatal(err)
	}
	if e.Seq <= entries[4].Seq {
		t.Fatalf("seq %d after reopen is not above %d", e.Seq, entries[4].Seq)
	}
}

func TestLimits(t *testing.T) {
	s, _, err := Open(t.TempDir(), Limits{MaxBytes: 1 << 20, MaxCount: 2}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	e1, _ := s.Put(delivery("a"))
	if _, err := s.Put(delivery("b")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(delivery("c")); !errors.Is(err, ErrFull) {
		t.Fatalf("third put: %v, want ErrFull", err)
	}
	if err := s.Remove(e1); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(delivery("c")); err != nil {
		t.Fatalf("put after remove: %v", err)
	}
	small, _, _ := Open(t.TempDir(), Limits{MaxBytes: 300, MaxCount: 100}, quiet())
	if _, err := small.Put(delivery(strings.Repeat("z", 400))); !errors.Is(err, ErrFull) {
		t.Fatalf("oversize put: %v, want ErrFull", err)
	}
}

func TestCorruptFilesAreQuarantinedAndTheRestKept(t *testing.T) {
	dir := t.TempDir()
	s, _, _ := Open(dir, Limits{MaxBytes: 1 << 20, MaxCount: 100}, quiet())
	good1, _ := s.Put(delivery("one"))
	bad, _ := s.Put(delivery("two"))
	good2, _ := s.Put(delivery("three"))
	// Damage one file, leave a crash's half-written temp file.
	if err := os.WriteFile(filepath.Join(dir, bad.name), []byte("FERRY-DELIVERY 1\n{garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "00000000000000ff-wh-x.delivery.tmp"), []byte("half"), 0o600)
	// Something that is not a file where a delivery would be: quarantined
	// unread (reading a named pipe would hang the agent's start).
	pipe := "00000000000000fe-wh-p.delivery"
	if err := syscall.Mkfifo(filepath.Join(dir, pipe), 0o600); err != nil {
		t.Fatal(err)
	}

	s2, entries, err := Open(dir, Limits{MaxBytes: 1 << 20, MaxCount: 100}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 || entries[0].ID != good1.ID || entries[1].ID != good2.ID {
		t.Fatalf("entries after corruption: %+v", entries)
	}
	st := s2.Stats()
	reasons := ""
	for _, q := range st.RecentQuarantine {
		reasons += q.Reason + "; "
	}
	if st.Quarantined != 2 || !strings.Contains(reasons, "metadata") || !strings.Contains(reasons, "is a named pipe, not a regular file") {
		t.Fatalf("quarantine not reported: %+v", st)
	}
	if _, err := os.Lstat(filepath.Join(dir, quarantineDir, pipe)); err != nil {
		t.Fatalf("the pipe was not moved to quarantine: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, quarantineDir, bad.name)); err != nil {
		t.Fatalf("corrupt file not kept in quarantine: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "00000000000000ff-wh-x.delivery.tmp")); !os.IsNotExist(err) {
		t.Fatalf("crash temp file not removed: %v", err)
	}
	if st.Spooled != 2 || st.Oldest.IsZero() {
		t.Fatalf("stats: %+v", st)
	}
	// A file damaged after opening is caught on Read.
	os.WriteFile(filepath.Join(dir, good2.name), []byte("nonsense"), 0o600)
	if _, err := s2.Read(entries[1]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("read of damaged file: %v", err)
	}
	if st := s2.Stats(); st.Spooled != 1 || st.Quarantined != 3 {
		t.Fatalf("after read-time quarantine: %+v", st)
	}
	d, err := s2.Read(entries[0])
	if err != nil || string(d.Body) != "one" {
		t.Fatalf("good delivery: %q, %v", d.Body, err)
	}
}

func FuzzDecode(f *testing.F) {
	good, _ := delivery(`{"eventKey":"pr:opened"}`).Encode()
	f.Add(good)
	f.Add([]byte(magic + "{}\n"))
	f.Add([]byte(magic + `{"id":"wh-1","body_len":0,"body_sha256":"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"}` + "\n"))
	f.Add([]byte("garbage"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Decode(data)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not wrapping ErrCorrupt: %v", err)
			}
			return
		}
		// Whatever decodes must encode and decode to the same delivery.
		again, err := d.Encode()
		if err != nil {
			return // e.g. headers too large to re-encode; decoding was still bounded
		}
		d2, err := Decode(again)
		if err != nil || d2.ID != d.ID || !bytes.Equal(d2.Body, d.Body) {
			t.Fatalf("re-encode differs: %v", err)
		}
	})
}
