package audit

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// On a real disk that fills up, a line the disk took only part of is
// taken back, shorter lines that still fit are written, and once there is
// room again every line is written: the file holds whole lines only.
func TestRealFullDiskKeepsWholeLines(t *testing.T) {
	disk := testrig.SmallDisk(t, 64<<10)
	p := filepath.Join(disk, "audit.jsonl")
	l, err := Open(Options{Path: p})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := l.Record(Entry{RequestID: "before"}); err != nil {
		t.Fatal(err)
	}
	filler := testrig.FillDisk(t, disk)
	// Longer than what is left of the log's last page: the disk takes
	// part of it, then fails.
	long := "/rest/api/1.0/projects/PROJ/repos/app/browse/" + strings.Repeat("d/", 3000)
	if err := l.Record(Entry{RequestID: "cut", Path: long}); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("a line longer than the room left: %v, want ENOSPC", err)
	}
	if err := l.Record(Entry{RequestID: "fits"}); err != nil {
		t.Fatalf("a short line that fits in the room left: %v", err)
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if err := l.Record(Entry{RequestID: "after", Path: long}); err != nil {
		t.Fatalf("once there is room: %v", err)
	}
	ids, bad := readLines(t, p)
	if fmt.Sprint(ids) != "[before fits after]" || len(bad) != 0 {
		t.Fatalf("log holds %v and unreadable lines %.200q; want before, fits, after", ids, bad)
	}
	if st := l.State(); st.Written != 3 || st.Lost != 1 || !strings.Contains(st.LastError, "no space left") {
		t.Fatalf("state %+v; want 3 written, 1 lost to the full disk", st)
	}
}
