package policy

import (
	"bufio"
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"

	"github.com/ferry-tunnel/ferry/internal/httpx"
)

// Inspection names a body check a rule's allowance depends on.
type Inspection uint8

const (
	InspectNone Inspection = iota
	// InspectReceivePack: every ref a git push updates (deletes included)
	// must lie under the push ref prefix.
	InspectReceivePack
	// InspectLFSBatch: the LFS batch request must be a download.
	InspectLFSBatch
	// InspectBranchCreate: the new branch must lie under the push prefix.
	InspectBranchCreate
	// InspectFileEdit: the commit must go to a branch under the prefix.
	InspectFileEdit
)

// Limits on what the agent reads to judge a body. Bodies judged whole
// (JSON, multipart) are small by nature; a git push's commands precede its
// pack and are read up to maxCommandBytes.
const (
	maxJudgedBody   = 16 << 20
	maxCommandBytes = 1 << 20
	maxCommands     = 4096
	// maxBranchField bounds a file edit's branch field: longer is no
	// branch name anyone uses, and it is refused rather than cut.
	maxBranchField = 1024
)

// DefaultPushRefPrefix is where bitbucket-dc-appsec lets a scanner write.
const DefaultPushRefPrefix = "refs/heads/ferry-fix/"

// Refusal is a body check's verdict against a request.
type Refusal struct {
	Status int
	Rule   string
	Reason string
	// Push is set when a git push was refused for its refs, so the caller
	// can answer in git's own report-status form.
	Push *ReceivePack
}

func (r *Refusal) Error() string { return r.Reason }

func refuse(rule, format string, args ...any) *Refusal {
	return &Refusal{Status: http.StatusForbidden, Rule: rule, Reason: fmt.Sprintf(format, args...)}
}

func malformed(rule, format string, args ...any) *Refusal {
	return &Refusal{Status: http.StatusBadRequest, Rule: rule, Reason: fmt.Sprintf(format, args...)}
}

// Body is a request body as it will be forwarded after a check.
type Body struct {
	R io.Reader
	// Decoded is true when a gzip Content-Encoding was removed: the
	// caller must drop Content-Encoding and Content-Length.
	Decoded bool
}

// CheckBody runs the inspection d requires. It reads only as much of body
// as it needs and returns the body to forward, which replays what was read
// followed by the rest. A refusal is a *Refusal; any other error means the
// body could not be read.
func (p *Policy) CheckBody(d Decision, header http.Header, body io.Reader) (Body, error) {
	if d.Inspect == InspectNone {
		return Body{R: body}, nil
	}
	out := Body{R: body}
	// What says how to read the body must say it once: servers differ on
	// which of two fields they take.
	for _, k := range []string{"Content-Type", "Content-Encoding"} {
		if len(header.Values(k)) > 1 {
			return out, malformed(d.Rule, "%s given more than once", k)
		}
	}
	enc := strings.ToLower(strings.TrimSpace(header.Get("Content-Encoding")))
	r, decoded, err := httpx.Unpack(enc, body)
	switch {
	case errors.Is(err, httpx.ErrUnknownEncoding):
		return out, malformed(d.Rule, "Content-Encoding %q cannot be inspected", enc)
	case err != nil:
		return out, malformed(d.Rule, "gzip body: %v", err)
	}
	out = Body{R: r, Decoded: decoded}
	switch d.Inspect {
	case InspectReceivePack:
		head, err := p.checkReceivePack(out.R)
		if err != nil {
			return out, err
		}
		out.R = io.MultiReader(bytes.NewReader(head), out.R)
		return out, nil
	}
	buf, err := io.ReadAll(io.LimitReader(out.R, maxJudgedBody+1))
	if err != nil {
		return out, fmt.Errorf("read body: %w", err)
	}
	if len(buf) > maxJudgedBody {
		return out, &Refusal{Status: http.StatusRequestEntityTooLarge, Rule: d.Rule, Reason: fmt.Sprintf("body larger than %d bytes", maxJudgedBody)}
	}
	out.R = bytes.NewReader(buf)
	switch d.Inspect {
	case InspectLFSBatch:
		return out, checkLFSBatch(d.Rule, buf)
	case InspectBranchCreate:
		return out, p.checkBranchCreate(d.Rule, buf)
	case InspectFileEdit:
		return out, p.checkFileEdit(d.Rule, header.Get("Content-Type"), buf)
	}
	return out, fmt.Errorf("policy: unknown inspection %d", d.Inspect)
}

// ReceivePack is the command list at the start of a git push.
type ReceivePack struct {
	Commands     []RefUpdate
	Capabilities []string
}

// Has reports whether the client announced capability c.
func (rp *ReceivePack) Has(c string) bool {
	for _, x := range rp.Capabilities {
		if x == c {
			return true
		}
	}
	return false
}

// RefUpdate is one command of a git push.
type RefUpdate struct {
	Old, New, Ref string
}

// Delete reports whether the update deletes the ref.
func (u RefUpdate) Delete() bool { return strings.Trim(u.New, "0") == "" }

var errFlush = errors.New("flush")

// ParseReceivePackCommands reads the ref-update commands at the start of a
// git-receive-pack request body (pkt-lines up to the first flush-pkt) and
// returns them with the exact bytes consumed. Shallow lines are skipped;
// signed pushes (push-cert) are refused as they are not parsed here.
func ParseReceivePackCommands(r io.Reader) (*ReceivePack, []byte, error) {
	var consumed bytes.Buffer
	br := bufio.NewReaderSize(io.TeeReader(r, &consumed), 4096)
	rp := &ReceivePack{}
	var cmds []RefUpdate
	total := 0
	for {
		line, n, err := readPktLine(br)
		total += n
		if errors.Is(err, errFlush) {
			break
		}
		if err != nil {
			return nil, nil, err
		}
		if total > maxCommandBytes {
			return nil, nil, fmt.Errorf("push commands exceed %d bytes", maxCommandBytes)
		}
		if strings.HasPrefix(line, "shallow ") {
			continue
		}
		if strings.HasPrefix(line, "push-cert") {
			return nil, nil, errors.New("signed pushes (push-cert) are not supported through ferry")
		}
		if len(cmds) == 0 {
			var caps string
			line, caps, _ = strings.Cut(line, "\x00") // capabilities follow the first command
			rp.Capabilities = strings.Fields(caps)
		} else if strings.Contains(line, "\x00") {
			return nil, nil, errors.New("NUL in a push command after the first")
		}
		line = strings.TrimSuffix(line, "\n")
		parts := strings.Split(line, " ")
		if len(parts) != 3 || !isObjectID(parts[0]) || !isObjectID(parts[1]) || len(parts[0]) != len(parts[1]) || !validRef(parts[2]) {
			return nil, nil, fmt.Errorf("malformed push command %q", httpx.Truncate(line, 120))
		}
		cmds = append(cmds, RefUpdate{Old: parts[0], New: parts[1], Ref: parts[2]})
		if len(cmds) > maxCommands {
			return nil, nil, fmt.Errorf("more than %d ref updates in one push", maxCommands)
		}
	}
	if len(cmds) == 0 {
		return nil, nil, errors.New("push without commands")
	}
	// consumed holds everything taken from r: what was parsed plus what
	// the bufio.Reader read ahead, so replaying it before r loses nothing.
	rp.Commands = cmds
	return rp, consumed.Bytes(), nil
}

// readPktLine reads one pkt-line; n is the bytes it took. A flush-pkt
// returns errFlush.
func readPktLine(br *bufio.Reader) (string, int, error) {
	var lenHex [4]byte
	if _, err := io.ReadFull(br, lenHex[:]); err != nil {
		return "", 0, fmt.Errorf("read pkt-line length: %w", err)
	}
	l, err := strconv.ParseUint(string(lenHex[:]), 16, 16)
	if err != nil {
		return "", 4, fmt.Errorf("pkt-line length %q is not hex", lenHex[:])
	}
	switch {
	case l == 0:
		return "", 4, errFlush
	case l < 4 || l > 65520:
		return "", 4, fmt.Errorf("pkt-line length %d out of range", l)
	}
	data := make([]byte, l-4)
	if _, err := io.ReadFull(br, data); err != nil {
		return "", 4, fmt.Errorf("read pkt-line: %w", err)
	}
	return string(data), int(l), nil
}

func isObjectID(s string) bool {
	if len(s) != 40 && len(s) != 64 {
		return false
	}
	_, err := hex.DecodeString(s)
	return err == nil && strings.ToLower(s) == s
}

// validRef is a conservative form of git check-ref-format: it refuses what
// could be read two ways.
func validRef(ref string) bool {
	if !strings.HasPrefix(ref, "refs/") || strings.HasSuffix(ref, "/") || strings.HasSuffix(ref, ".lock") || strings.HasSuffix(ref, ".") {
		return false
	}
	if strings.Contains(ref, "..") || strings.Contains(ref, "//") || strings.Contains(ref, "@{") || strings.Contains(ref, "/.") {
		return false
	}
	for _, c := range ref {
		if c < 0x21 || c == 0x7f || strings.ContainsRune(` ~^:?*[\`, c) {
			return false
		}
	}
	return true
}

func (p *Policy) checkReceivePack(r io.Reader) ([]byte, error) {
	rp, consumed, err := ParseReceivePackCommands(r)
	if err != nil {
		return nil, malformed("git-push", "git push: %v", err)
	}
	for _, c := range rp.Commands {
		if !strings.HasPrefix(c.Ref, p.pushPrefix) {
			verb := "update"
			if c.Delete() {
				verb = "delete"
			}
			ref := refuse("git-push", "push refused: %s of %s is outside %s*, the only refs this tunnel may write", verb, c.Ref, p.pushPrefix)
			ref.Push = rp
			return nil, ref
		}
	}
	return consumed, nil
}

func checkLFSBatch(rule string, body []byte) error {
	fields, err := uniqueJSONFields(body)
	if err != nil {
		return malformed(rule, "LFS batch request: %v", err)
	}
	var op string
	if err := json.Unmarshal(fields["operation"], &op); err != nil || op != "download" {
		return refuse(rule, "Git LFS: only downloads are allowed (operation %q)", op)
	}
	return nil
}

// branchName accepts "name" or "refs/heads/name" and checks it against
// the push prefix.
func (p *Policy) branchAllowed(name string) bool {
	ref := name
	if !strings.HasPrefix(ref, "refs/") {
		ref = "refs/heads/" + ref
	}
	return validRef(ref) && strings.HasPrefix(ref, p.pushPrefix)
}

func (p *Policy) checkBranchCreate(rule string, body []byte) error {
	fields, err := uniqueJSONFields(body)
	if err != nil {
		return malformed(rule, "branch create: %v", err)
	}
	var name string
	if err := json.Unmarshal(fields["name"], &name); err != nil || name == "" {
		return malformed(rule, "branch create: \"name\" must be a string")
	}
	if !p.branchAllowed(name) {
		return refuse(rule, "branch %q is outside %s*, the only refs this tunnel may write", name, p.pushPrefix)
	}
	return nil
}

func (p *Policy) checkFileEdit(rule, contentType string, body []byte) error {
	// No RFC 2231 parameters: Go would take "boundary*=utf-8''B" over
	// "boundary=A", a server that never implemented them takes A, and a
	// body with a form under each boundary would show the two of them
	// different branches. No boundary has a '*' in it (RFC 2046).
	if strings.Contains(contentType, "*") {
		return malformed(rule, "file edit: Content-Type with an extended (RFC 2231) parameter")
	}
	mt, params, err := mime.ParseMediaType(contentType)
	if err != nil || mt != "multipart/form-data" || params["boundary"] == "" {
		return malformed(rule, "file edit must be multipart/form-data")
	}
	mr := multipart.NewReader(bytes.NewReader(body), params["boundary"])
	seen := map[string]string{}
	for {
		// Raw: NextPart would decode a quoted-printable part, which
		// Bitbucket does not (RFC 7578 retired Content-Transfer-Encoding),
		// so "=66erry-fix/x" would be judged as ferry-fix/x and written
		// to a branch outside the prefix.
		part, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			return malformed(rule, "file edit form: %v", err)
		}
		name, err := formName(part.Header)
		if err != nil {
			return malformed(rule, "file edit form: %v", err)
		}
		if name == "branch" || name == "sourceBranch" {
			if _, dup := seen[name]; dup {
				return malformed(rule, "file edit: field %q given twice", name)
			}
			switch cte := strings.ToLower(strings.TrimSpace(part.Header.Get("Content-Transfer-Encoding"))); cte {
			case "", "7bit", "8bit", "binary":
			default:
				return malformed(rule, "file edit: field %q has Content-Transfer-Encoding %q; send it as is", name, cte)
			}
			// Judge the whole value, never a cut of it.
			v, err := io.ReadAll(io.LimitReader(part, maxBranchField+1))
			if err != nil {
				return malformed(rule, "file edit form: %v", err)
			}
			if len(v) > maxBranchField {
				return malformed(rule, "file edit: field %q is longer than %d bytes", name, maxBranchField)
			}
			seen[name] = strings.TrimSpace(string(v))
		}
		part.Close()
	}
	branch, ok := seen["branch"]
	if !ok || branch == "" {
		return refuse(rule, "file edit without a branch field would commit to the default branch; name a branch under %s", p.pushPrefix)
	}
	if !p.branchAllowed(branch) {
		return refuse(rule, "file edit on branch %q is outside %s*, the only refs this tunnel may write", branch, p.pushPrefix)
	}
	return nil
}

// formName is a form part's field name, from a Content-Disposition that
// every server reads the same way. Go names no field for a disposition
// it cannot parse (a name given twice), or that is not exactly form-data
// ("form-data-x"), or takes "name*=utf-8'en'branch" for branch; a server
// checking only that the header starts with form-data, or taking the
// first name, or knowing nothing of RFC 2231, would see a branch field
// the check never saw, or miss the one it saw and commit to the default
// branch. Such a part is refused whatever its name. (filename*= is
// fine: no name hides in it.)
func formName(h textproto.MIMEHeader) (string, error) {
	cds := h.Values("Content-Disposition")
	if len(cds) != 1 {
		return "", fmt.Errorf("a part has %d Content-Disposition fields, not one", len(cds))
	}
	disp, params, err := mime.ParseMediaType(cds[0])
	if err != nil || disp != "form-data" {
		return "", fmt.Errorf("Content-Disposition %q is not plain form-data", cds[0])
	}
	for _, piece := range strings.Split(strings.ToLower(cds[0]), ";") {
		if strings.HasPrefix(strings.TrimSpace(piece), "name*") {
			return "", fmt.Errorf("Content-Disposition %q names its field with an extended (RFC 2231) parameter", cds[0])
		}
	}
	return params["name"], nil
}

// uniqueJSONFields reads a JSON object's top-level fields, refusing
// duplicate keys: parsers disagree on which one wins.
func uniqueJSONFields(body []byte) (map[string]json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(body))
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	out := map[string]json.RawMessage{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, err
		}
		if _, dup := out[key]; dup {
			return nil, fmt.Errorf("key %q appears twice", key)
		}
		out[key] = v
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("trailing data after the JSON object")
	}
	return out, nil
}
