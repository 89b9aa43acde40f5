package policy

import (
	"fmt"
	"path"
	"strings"
)

// pattern matches canonical paths segment by segment, case-insensitively:
//
//   - exactly one segment (may be part of one: "*.git")
//     **       zero or more segments (a whole segment only)
//     {a,b}    one segment, any of the alternatives (each may use *)
type pattern struct {
	src  string
	segs []segment
}

type segment struct {
	any   bool     // **
	globs []string // alternatives, lower case
}

func compilePattern(src string) (pattern, error) {
	if !strings.HasPrefix(src, "/") {
		return pattern{}, fmt.Errorf("path pattern %q must start with /", src)
	}
	p := pattern{src: src}
	for _, s := range strings.Split(strings.TrimPrefix(src, "/"), "/") {
		if s == "" {
			return pattern{}, fmt.Errorf("path pattern %q has an empty segment", src)
		}
		if s == "**" {
			p.segs = append(p.segs, segment{any: true})
			continue
		}
		if strings.Contains(s, "**") {
			return pattern{}, fmt.Errorf("path pattern %q: ** must be a whole segment", src)
		}
		alts := []string{s}
		if strings.HasPrefix(s, "{") && strings.HasSuffix(s, "}") {
			alts = strings.Split(s[1:len(s)-1], ",")
		}
		for i, a := range alts {
			if a == "" || strings.ContainsAny(a, "{}[]\\") {
				return pattern{}, fmt.Errorf("path pattern %q: bad segment %q", src, s)
			}
			alts[i] = strings.ToLower(a)
		}
		p.segs = append(p.segs, segment{globs: alts})
	}
	return p, nil
}

// match reports whether the canonical path p (from NormalizePath) matches.
// A trailing slash is ignored: Bitbucket treats /x and /x/ alike.
func (p pattern) match(canonical string) bool { return matchSegs(p.segs, pathSegments(canonical)) }

// pathSegments is what patterns match against: lower case, no leading
// or trailing slash, split. Decide computes it once per request.
func pathSegments(canonical string) []string {
	s := strings.TrimSuffix(strings.TrimPrefix(strings.ToLower(canonical), "/"), "/")
	if s == "" {
		return nil
	}
	return strings.Split(s, "/")
}

func matchSegs(pat []segment, segs []string) bool {
	for len(pat) > 0 {
		if pat[0].any {
			for i := 0; i <= len(segs); i++ {
				if matchSegs(pat[1:], segs[i:]) {
					return true
				}
			}
			return false
		}
		if len(segs) == 0 || !pat[0].matchOne(segs[0]) {
			return false
		}
		pat, segs = pat[1:], segs[1:]
	}
	return len(segs) == 0
}

func (s segment) matchOne(seg string) bool {
	for _, g := range s.globs {
		if ok, _ := path.Match(g, seg); ok {
			return true
		}
	}
	return false
}
