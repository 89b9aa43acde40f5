package secret

import (
	"os"
	"path/filepath"
	"strings"
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
