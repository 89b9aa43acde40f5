package agent

import (
	"bytes"
	"fmt"
	"net/http"
	"strings"

	"github.com/ferry-tunnel/ferry/internal/policy"
)

// writePushRejection answers a refused git push the way a git server
// does: HTTP 200 with a report-status that rejects every ref ("ng"), so
// git prints "! [remote rejected] ref (reason)". Git ignores the body of a
// non-200 answer to git-receive-pack, which is why this is not a 403.
// It reports false when the client did not ask for report-status.
func writePushRejection(w http.ResponseWriter, rp *policy.ReceivePack, reason string, prefix string) bool {
	// report-status-v2 (git 2.29+) reads the same "unpack"/"ng" lines.
	if !rp.Has("report-status") && !rp.Has("report-status-v2") {
		return false
	}
	var report bytes.Buffer
	writePkt(&report, "unpack ok\n")
	for _, c := range rp.Commands {
		why := "ferry: only " + prefix + "* may be written through this tunnel"
		if strings.HasPrefix(c.Ref, prefix) {
			why = "ferry: push refused as a whole: another ref is outside " + prefix + "*"
		}
		writePkt(&report, "ng "+c.Ref+" "+why+"\n")
	}
	report.WriteString("0000")

	var out bytes.Buffer
	if rp.Has("side-band-64k") || rp.Has("side-band") {
		max := 65519 // side-band-64k: 65520 minus the band byte
		if !rp.Has("side-band-64k") {
			max = 999
		}
		writePkt(&out, "\x02ferry: "+reason+"\n")
		b := report.Bytes()
		for len(b) > 0 {
			n := min(len(b), max)
			writePkt(&out, "\x01"+string(b[:n]))
			b = b[n:]
		}
		out.WriteString("0000")
	} else {
		out.Write(report.Bytes())
	}
	w.Header().Set("Content-Type", "application/x-git-receive-pack-result")
	w.Header().Set("Cache-Control", "no-cache")
	w.Header().Set("X-Ferry-Error", "policy_denied")
	w.WriteHeader(http.StatusOK)
	w.Write(out.Bytes())
	return true
}

func writePkt(b *bytes.Buffer, s string) {
	fmt.Fprintf(b, "%04x%s", len(s)+4, s)
}
