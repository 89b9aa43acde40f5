// Package token makes and checks the bearer tokens agents and scanners
// present. The relay only ever holds SHA-256 hashes of tokens.
package token

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"strings"
)

// Hash is the SHA-256 of a token's bytes.
type Hash [sha256.Size]byte

const hashPrefix = "sha256:"

// Generate returns a new random token: 32 bytes from crypto/rand, base64url.
func Generate() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate token: %w", err)
	}
	return "fry_" + base64.RawURLEncoding.EncodeToString(b[:]), nil
}

// Of hashes a token as presented on the wire.
func Of(tok string) Hash { return sha256.Sum256([]byte(tok)) }

// String is the config form, "sha256:<lowercase hex>".
func (h Hash) String() string { return hashPrefix + hex.EncodeToString(h[:]) }

// ParseHash reads the config form. Upper-case hex is refused so that one
// token has exactly one spelling in config files (greppable, diffable).
func ParseHash(s string) (Hash, error) {
	var h Hash
	hx, ok := strings.CutPrefix(s, hashPrefix)
	if !ok {
		return h, fmt.Errorf("want \"sha256:<64 lowercase hex>\" (from `ferry-relay token`), got %q", redact(s))
	}
	if len(hx) != 2*len(h) || strings.ToLower(hx) != hx {
		return h, fmt.Errorf("want 64 lowercase hex digits after \"sha256:\", got %d characters", len(hx))
	}
	if _, err := hex.Decode(h[:], []byte(hx)); err != nil {
		return h, fmt.Errorf("not hex after \"sha256:\": %v", err)
	}
	return h, nil
}

// redact shows the start of a value that might be a raw token pasted by
// mistake, without printing the token into a log.
func redact(s string) string {
	if len(s) <= 8 {
		return s
	}
	return s[:6] + "…"
}

// Index finds which of hashes h equals, comparing against every entry in
// constant time per entry so timing does not reveal where a match is.
// It returns -1 when none match.
func Index(hashes []Hash, h Hash) int {
	found := -1
	for i := range hashes {
		if subtle.ConstantTimeCompare(hashes[i][:], h[:]) == 1 && found < 0 {
			found = i
		}
	}
	return found
}
