package token

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
)

func TestGenerateAndHash(t *testing.T) {
	a, err := Generate()
	if err != nil {
		t.Fatal(err)
	}
	b, _ := Generate()
	if a == b || !strings.HasPrefix(a, "fry_") || len(a) < 40 {
		t.Fatalf("tokens %q %q", a, b)
	}
	sum := sha256.Sum256([]byte(a))
	want := "sha256:" + hex.EncodeToString(sum[:])
	if got := Of(a).String(); got != want {
		t.Fatalf("hash form %q, want %q", got, want)
	}
	h, err := ParseHash(want)
	if err != nil || h != Of(a) {
		t.Fatalf("parse: %v", err)
	}
}

func TestParseHashRejects(t *testing.T) {
	good := Of("x").String()
	for _, s := range []string{"", "fry_abcdefghijkl", strings.ToUpper(good[:7]) + good[7:], "sha256:" + strings.ToUpper(good[7:]), good[:len(good)-1], good + "0", "sha256:" + strings.Repeat("zz", 32)} {
		if _, err := ParseHash(s); err == nil {
			t.Errorf("ParseHash(%q) accepted", s)
		}
	}
	if _, err := ParseHash("fry_secretsecretsecret"); err == nil || strings.Contains(err.Error(), "secretsecret") {
		t.Errorf("error leaks a pasted token: %v", err)
	}
}

func TestIndex(t *testing.T) {
	hs := []Hash{Of("a"), Of("b"), Of("c")}
	if Index(hs, Of("b")) != 1 || Index(hs, Of("z")) != -1 || Index(nil, Of("a")) != -1 {
		t.Fatal("Index wrong")
	}
}
