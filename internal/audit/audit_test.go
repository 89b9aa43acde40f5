package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
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
