package spool

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

// On a real full disk a delivery is refused with the disk's error, leaves
// no partial file and no reserved room behind, and once there is room
// again deliveries are taken; a restart finds exactly the accepted ones.
func TestFullDiskRefusesAndLeavesNothing(t *testing.T) {
	disk := testrig.SmallDisk(t, 256<<10)
	dir := filepath.Join(disk, "spool")
	s, _, err := Open(dir, Limits{MaxBytes: 1 << 20, MaxCount: 100}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	first, err := s.Put(delivery("before the disk filled"))
	if err != nil {
		t.Fatal(err)
	}
	filler := testrig.FillDisk(t, disk)

	body := string(make([]byte, 8<<10)) // more than one page: the write itself fails
	for range 3 {
		if _, err := s.Put(delivery(body)); !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("Put on a full disk: %v, want ENOSPC", err)
		}
	}
	if st := s.Stats(); st.Spooled != 1 || st.Bytes != first.Size {
		t.Fatalf("after refusals the spool counts %d deliveries, %d bytes; want 1, %d", st.Spooled, st.Bytes, first.Size)
	}
	if names := listDir(t, dir); !slices.Equal(names, []string{first.name}) {
		t.Fatalf("the spool directory holds %v; want only the accepted delivery", names)
	}

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	second, err := s.Put(delivery(body))
	if err != nil {
		t.Fatalf("Put once there is room again: %v", err)
	}
	_, entries, err := Open(dir, Limits{MaxBytes: 1 << 20, MaxCount: 100}, quiet())
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.ID)
	}
	if !slices.Equal(ids, []string{first.ID, second.ID}) {
		t.Fatalf("a restart finds %v; want the two accepted deliveries %v", ids, []string{first.ID, second.ID})
	}
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		if e.Name() == quarantineDir {
			continue
		}
		names = append(names, e.Name())
	}
	return names
}
