package httpx

import (
	"net/http"
	"strings"
	"unicode/utf8"
)

// Truncate shortens s to at most n bytes (on a rune boundary) plus "…",
// for status pages and messages that must stay readable under floods.
func Truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + "…"
}

// IsGit reports whether the client is git, which reads errors as plain
// text and push refusals in its own report format.
func IsGit(r *http.Request) bool { return strings.HasPrefix(r.Header.Get("User-Agent"), "git/") }
