package policy

import (
	"errors"
	"fmt"
	"net/url"
	"strings"
	"unicode/utf8"
)

// ErrAmbiguous is wrapped by every normalisation refusal. Requests that
// fail normalisation are answered 400 and never reach an upstream.
var ErrAmbiguous = errors.New("ambiguous path")

// NormalizePath checks the raw (still percent-encoded) path of a request and
// returns its one canonical decoded form. It refuses instead of cleaning:
// a path whose meaning could differ between ferry and the upstream (dot
// segments, encoded separators, double encoding, path parameters, empty
// segments, backslashes, control characters) is an error. The caller
// forwards exactly the returned path, so what was checked is what is sent.
func NormalizePath(raw string) (string, error) {
	if raw == "" || raw[0] != '/' {
		return "", fmt.Errorf("%w: must start with /", ErrAmbiguous)
	}
	if len(raw) > maxPathLen {
		return "", fmt.Errorf("%w: longer than %d bytes", ErrAmbiguous, maxPathLen)
	}
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		switch {
		case c == ';':
			return "", fmt.Errorf("%w: path parameters (;) are not allowed", ErrAmbiguous)
		case c == '\\':
			return "", fmt.Errorf("%w: backslash", ErrAmbiguous)
		case c < 0x21 || c >= 0x7f:
			return "", fmt.Errorf("%w: raw byte 0x%02x must be percent-encoded", ErrAmbiguous, c)
		case c == '%':
			if i+2 >= len(raw) || !isHex(raw[i+1]) || !isHex(raw[i+2]) {
				return "", fmt.Errorf("%w: malformed percent-encoding", ErrAmbiguous)
			}
			switch d := unhex(raw[i+1])<<4 | unhex(raw[i+2]); {
			case d == '/':
				return "", fmt.Errorf("%w: encoded slash (%%2F)", ErrAmbiguous)
			case d == '\\':
				return "", fmt.Errorf("%w: encoded backslash (%%5C)", ErrAmbiguous)
			case d == '%':
				return "", fmt.Errorf("%w: double encoding (%%25)", ErrAmbiguous)
			case d == ';':
				return "", fmt.Errorf("%w: encoded path parameter (%%3B)", ErrAmbiguous)
			case d < 0x20 || d == 0x7f:
				return "", fmt.Errorf("%w: encoded control character", ErrAmbiguous)
			}
			i += 2
		}
	}
	p, err := url.PathUnescape(raw)
	if err != nil {
		return "", fmt.Errorf("%w: %v", ErrAmbiguous, err)
	}
	if !utf8.ValidString(p) {
		return "", fmt.Errorf("%w: not valid UTF-8", ErrAmbiguous)
	}
	segs := strings.Split(p[1:], "/")
	for i, s := range segs {
		if s == "" && i != len(segs)-1 {
			return "", fmt.Errorf("%w: empty segment (//)", ErrAmbiguous)
		}
		if s != "" && strings.Trim(s, ".") == "" {
			return "", fmt.Errorf("%w: dot segment %q", ErrAmbiguous, s)
		}
	}
	return p, nil
}

const maxPathLen = 4096

func isHex(c byte) bool {
	return '0' <= c && c <= '9' || 'a' <= c && c <= 'f' || 'A' <= c && c <= 'F'
}

func unhex(c byte) byte {
	switch {
	case '0' <= c && c <= '9':
		return c - '0'
	case 'a' <= c && c <= 'f':
		return c - 'a' + 10
	default:
		return c - 'A' + 10
	}
}

// NormalizeQuery parses a raw query strictly: malformed escapes and
// repeated keys that the policy looks at are refused.
func NormalizeQuery(raw string) (url.Values, error) {
	q, err := url.ParseQuery(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: query: %v", ErrAmbiguous, err)
	}
	return q, nil
}
