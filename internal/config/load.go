// Package config parses and validates ferry's YAML configuration files.
// Parsing happens once, at start-up or reload; everything after works on the
// typed, validated structs. Any problem is a *Error naming file, line, field.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/ferry-tunnel/ferry/internal/readfile"
	"github.com/ferry-tunnel/ferry/internal/secret"
)

// Error is a configuration problem. Its message is one line: it is what an
// operator sees when the daemon refuses to start (exit code 2).
type Error struct {
	File  string
	Line  int    // 0 when unknown
	Field string // dotted path, e.g. "tunnels[0].agent_tokens[1]"
	Msg   string
}

func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Field != "" {
		b.WriteString(": ")
		b.WriteString(e.Field)
	}
	b.WriteString(": ")
	b.WriteString(e.Msg)
	return oneLine(b.String())
}

// oneLine escapes control characters, so that a value quoted from the file
// (a YAML error quotes the text it could not read) cannot break the
// message over lines or write escape sequences to the operator's terminal.
func oneLine(s string) string {
	if !strings.ContainsFunc(s, isControl) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '\n':
			b.WriteString(`\n`)
		case isControl(r):
			fmt.Fprintf(&b, `\x%02x`, r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func isControl(r rune) bool { return r < 0x20 && r != '\t' || r == 0x7f || r >= 0x80 && r < 0xa0 }

// IsConfigError reports whether err is (or wraps) a configuration error.
func IsConfigError(err error) bool {
	var e *Error
	return errors.As(err, &e)
}

// validator collects the first problem found while checking a config.
type validator struct {
	file string
	root *yaml.Node
	err  *Error
}

// failf records a problem with field (a dotted path) unless one is recorded.
func (v *validator) failf(field, format string, args ...any) {
	if v.err != nil {
		return
	}
	v.err = &Error{File: v.file, Line: lineOf(v.root, field), Field: field, Msg: fmt.Sprintf(format, args...)}
}

func (v *validator) failed() bool { return v.err != nil }

// decodeStrict reads a YAML document into out, refusing unknown fields and
// trailing documents. It also returns the node tree so that validation
// errors can point at a line.
func decodeStrict(file string, data []byte, out any) (*yaml.Node, error) {
	var root yaml.Node
	if err := yaml.Unmarshal(data, &root); err != nil {
		return nil, yamlError(file, data, err)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, &Error{File: file, Msg: "file is empty"}
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(out); err != nil {
		var te *yaml.TypeError
		if errors.As(err, &te) && len(te.Errors) > 0 {
			return nil, parseTypeError(file, te.Errors[0])
		}
		return nil, yamlError(file, data, err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); err != io.EOF {
		return nil, &Error{File: file, Msg: "more than one YAML document; ferry reads exactly one"}
	}
	return &root, nil
}

var (
	unknownFieldRE = regexp.MustCompile(`^line (\d+): field (\S+) not found in type (\S+)$`)
	lineRE         = regexp.MustCompile(`^line (\d+): (.*)$`)
)

func parseTypeError(file, msg string) *Error {
	msg = oneLine(msg) // before matching: a quoted value may hold a newline
	if m := unknownFieldRE.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &Error{File: file, Line: line, Field: m[2], Msg: "unknown field (check spelling and indentation)"}
	}
	if m := lineRE.FindStringSubmatch(msg); m != nil {
		line, _ := strconv.Atoi(m[1])
		return &Error{File: file, Line: line, Msg: m[2]}
	}
	return &Error{File: file, Msg: msg}
}

// yamlError turns a yaml.v3 syntax error ("yaml: line 6: did not find
// expected key") into file:line form, with a hint for the common trap of
// an unquoted ${CREDENTIALS_DIRECTORY} inside a {flow: mapping}.
func yamlError(file string, data []byte, err error) *Error {
	e := parseTypeError(file, strings.TrimPrefix(err.Error(), "yaml: "))
	lines := strings.Split(string(data), "\n")
	for _, l := range []int{e.Line - 1, e.Line, e.Line + 1} { // yaml.v3 may report a neighbouring line
		if l >= 1 && l <= len(lines) && strings.Contains(lines[l-1], "${") && strings.Contains(lines[l-1], "{") {
			e.Msg += ` (hint: quote values with ${...} inside {...}, e.g. token_file: "${CREDENTIALS_DIRECTORY}/pat")`
			break
		}
	}
	return e
}

// lineOf finds the line of a dotted field path such as "tunnels[1].id" in
// the document, or of its closest existing ancestor; 0 if nothing matches.
func lineOf(root *yaml.Node, path string) int {
	if root == nil {
		return 0
	}
	n := root
	if n.Kind == yaml.DocumentNode && len(n.Content) > 0 {
		n = n.Content[0]
	}
	line := 0
	for _, part := range strings.Split(path, ".") {
		name, idx := part, -1
		if i := strings.IndexByte(part, '['); i >= 0 && strings.HasSuffix(part, "]") {
			name = part[:i]
			idx, _ = strconv.Atoi(part[i+1 : len(part)-1])
		}
		next := mapValue(n, name)
		if next == nil {
			return line
		}
		n, line = next, next.Line
		if idx >= 0 {
			if n.Kind != yaml.SequenceNode || idx >= len(n.Content) {
				return line
			}
			n = n.Content[idx]
			line = n.Line
		}
	}
	return line
}

func mapValue(n *yaml.Node, key string) *yaml.Node {
	if n.Kind != yaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(n.Content); i += 2 {
		if n.Content[i].Value == key {
			return n.Content[i+1]
		}
	}
	return nil
}

// maxConfig bounds a config file: thousands of tunnels and scanners take
// a few MiB at most.
const maxConfig = 16 << 20

// maxCABundle bounds a CA bundle (the system's is a few hundred KiB).
const maxCABundle = 4 << 20

// readFile reads a config file, with the error already in config form.
func readFile(path string) ([]byte, error) {
	data, err := readfile.Limited(path, maxConfig)
	if err != nil {
		return nil, &Error{File: path, Msg: fmt.Sprintf("cannot read: %v", unwrapPathError(err))}
	}
	return data, nil
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// ExpandCredentialsDir replaces ${CREDENTIALS_DIRECTORY} (systemd
// LoadCredential=) in a file path. Other variables are left alone: paths
// are not a templating language.
func ExpandCredentialsDir(path string) (string, error) {
	const v1, v2 = "${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"
	if !strings.Contains(path, v2) && !strings.Contains(path, v1) {
		return path, nil
	}
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" {
		return "", fmt.Errorf("uses $CREDENTIALS_DIRECTORY, which is not set (start under systemd with LoadCredential=, or give a plain path)")
	}
	path = strings.ReplaceAll(path, v1, dir)
	return strings.ReplaceAll(path, v2, dir), nil
}

// openSecretFile opens the secret file a field names (required), with
// ${CREDENTIALS_DIRECTORY} expanded in place, or records why it cannot.
func openSecretFile(v *validator, field string, path *string) secret.Source {
	if *path == "" {
		v.failf(field, "required")
		return nil
	}
	p, err := ExpandCredentialsDir(*path)
	if err != nil {
		v.failf(field, "%v", err)
		return nil
	}
	*path = p
	s, err := secret.NewFile(p)
	if err != nil {
		v.failf(field, "%v", err)
		return nil
	}
	return s
}

// Log configures logging on either side.
type Log struct {
	Level  string `yaml:"level"`  // debug, info (default), warn, error
	Format string `yaml:"format"` // json (default) or text
}

func (v *validator) checkLog(l *Log) {
	switch l.Level {
	case "":
		l.Level = "info"
	case "debug", "info", "warn", "error":
	default:
		v.failf("log.level", "%q is not one of debug, info, warn, error", l.Level)
	}
	switch l.Format {
	case "":
		l.Format = "json"
	case "json", "text":
	default:
		v.failf("log.format", "%q is not one of json, text", l.Format)
	}
}

// count defaults *n to def when unset and checks it is in 1..hi.
func (v *validator) count(field string, n *int, def, hi int) {
	switch {
	case *n == 0:
		*n = def
	case *n < 1 || *n > hi:
		v.failf(field, "%d is out of range 1-%d", *n, hi)
	}
}

// duration applies a default and bounds to a duration field.
func (v *validator) duration(field string, d *time.Duration, def, lo, hi time.Duration) {
	switch {
	case *d == 0:
		*d = def
	case *d < lo || *d > hi:
		v.failf(field, "%s is out of range %s-%s", *d, lo, hi)
	}
}

// parse decodes and validates one config file into out.
func parse[T any](file string, data []byte, out *T, validate func(*T, *validator)) (*T, error) {
	root, err := decodeStrict(file, data, out)
	if err != nil {
		return nil, err
	}
	v := &validator{file: file, root: root}
	validate(out, v)
	if v.failed() {
		return nil, v.err
	}
	return out, nil
}

// load reads a config file and parses it.
func load[T any](path string, parseFn func(string, []byte) (*T, error)) (*T, error) {
	data, err := readFile(path)
	if err != nil {
		return nil, err
	}
	return parseFn(path, data)
}
