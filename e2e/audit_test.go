package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ferry-tunnel/ferry/internal/audit"
	"github.com/ferry-tunnel/ferry/internal/httperr"
)

// TestAuditLogThatCannotBeWritten: with the audit log's disk full
// (/dev/full answers every write with ENOSPC) requests are still served,
// and every decision the log could not take is counted, logged and shown
// by `ferry-agent status`.
func TestAuditLogThatCannotBeWritten(t *testing.T) {
	_, agentBin := binaries(t)
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	a, arun := w.startAgentYAML(strings.Replace(w.agentYAML(r.AgentAddr(), ""), filepath.Join(w.dir, "audit.jsonl"), "/dev/full", 1))
	defer arun.shutdown(t)
	waitFor(t, "agent connected", func() bool { return a.Connected() == 2 })
	waitCredentialCheck(t, a)
	e := &env{world: w, relay: r, agent: a, client: newClient(), scannerBase: "http://" + r.ScannerAddr() + "/t/" + tunnelID + "/bitbucket"}
	defer e.client.CloseIdleConnections()

	for range 2 {
		if status, _, body := e.do("GET", e.scannerBase+"/rest/api/1.0/projects", scannerToken, nil, nil); status != 200 {
			t.Fatalf("request with the audit log full: %d %s", status, body)
		}
	}
	waitFor(t, "lost lines counted", func() bool { return testutil.ToFloat64(a.Metrics().AuditLost) == 2 })
	st := a.Status().Audit
	if st == nil || st.Path != "/dev/full" || st.Lost != 2 || st.Written != 0 || !strings.Contains(st.LastError, "no space left on device") {
		t.Fatalf("status audit: %+v", st)
	}
	if page := getPage(t, "http://"+a.DiagAddr()+"/"); !strings.Contains(page, "2 lost") || !strings.Contains(page, "no space left on device") {
		t.Errorf("status page does not show the lost decisions")
	}
	out, err := exec.Command(agentBin, "status", "--addr", a.DiagAddr()).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "audit:     /dev/full: 0 decisions recorded since start, 2 LOST") ||
		!strings.Contains(string(out), "no space left on device") {
		t.Fatalf("ferry-agent status: %v\n%s", err, out)
	}
}

// TestReloadReopensAMovedAuditLog: after the audit file was moved away
// (logrotate without copytruncate), a reload makes the agent write a new
// file at audit.path instead of the moved one.
func TestReloadReopensAMovedAuditLog(t *testing.T) {
	e := newEnv(t)
	w := e.world
	w.write("agent.yaml", w.agentYAML(e.relay.AgentAddr(), ""))
	get := func() string {
		status, hdr, body := e.do("GET", e.scannerBase+"/rest/api/1.0/projects", scannerToken, nil, nil)
		if status != 200 {
			t.Fatalf("request: %d %s", status, body)
		}
		return hdr.Get(httperr.RequestIDHeader)
	}
	first := get()
	waitFor(t, "first decision recorded", func() bool {
		return auditHas(t, w.dir, func(a audit.Entry) bool { return a.RequestID == first })
	})
	p := filepath.Join(w.dir, "audit.jsonl")
	if err := os.Rename(p, p+".moved"); err != nil {
		t.Fatal(err)
	}
	if err := e.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	second := get()
	waitFor(t, "second decision in a new file at audit.path", func() bool {
		_, err := os.Stat(p)
		return err == nil && auditHas(t, w.dir, func(a audit.Entry) bool { return a.RequestID == second })
	})
	if auditHas(t, w.dir, func(a audit.Entry) bool { return a.RequestID == first }) {
		t.Fatal("the new file holds the moved file's lines")
	}
}

// TestReloadMovesTheAuditLog: audit.path changes on reload. A path that
// cannot be opened refuses the reload, and decisions go on to the old
// file; once it can, they go to the new one.
func TestReloadMovesTheAuditLog(t *testing.T) {
	e := newEnv(t)
	w := e.world
	old := filepath.Join(w.dir, "audit.jsonl")
	next := filepath.Join(w.dir, "audit", "decisions.jsonl")
	base := w.agentYAML(e.relay.AgentAddr(), "")
	get := func() string {
		status, hdr, body := e.do("GET", e.scannerBase+"/rest/api/1.0/projects", scannerToken, nil, nil)
		if status != 200 {
			t.Fatalf("request: %d %s", status, body)
		}
		return hdr.Get(httperr.RequestIDHeader)
	}
	recorded := func(path, rid string) bool {
		return auditFileHas(t, path, func(a audit.Entry) bool { return a.RequestID == rid })
	}
	w.write("agent.yaml", strings.Replace(base, "audit: {path: "+old+"}", "audit: {path: "+next+", max_files: 3}", 1))
	err := e.agent.Reload()
	if err == nil || !strings.Contains(err.Error(), "audit.path "+next) {
		t.Fatalf("reload to an audit path whose directory is missing: %v", err)
	}
	first := get()
	waitFor(t, "the decision in the old file", func() bool { return recorded(old, first) })

	if err := os.Mkdir(filepath.Dir(next), 0o750); err != nil {
		t.Fatal(err)
	}
	if err := e.agent.Reload(); err != nil {
		t.Fatal(err)
	}
	second := get()
	waitFor(t, "the decision in the new file", func() bool {
		_, err := os.Stat(next)
		return err == nil && recorded(next, second)
	})
	if recorded(old, second) {
		t.Error("a decision after the move went to the old file too")
	}
	if st := e.agent.Status().Audit; st == nil || st.Path != next || st.Written < 2 {
		t.Errorf("audit status after the move: %+v", st)
	}

	// With the audit log off, its bounds are nothing to refuse a reload
	// over; turning it on waits for a restart.
	off := strings.Replace(base, "audit: {path: "+old+"}\n", "", 1)
	w.write("agent.yaml", off)
	a, arun := w.startAgentYAML(off)
	defer arun.shutdown(t)
	for _, y := range []string{off + "audit: {max_files: 2}\n", off + "audit: {path: " + old + "}\n"} {
		w.write("agent.yaml", y)
		if err := a.Reload(); err != nil {
			t.Errorf("reload of an agent without an audit log: %v", err)
		}
		if a.Status().Audit != nil {
			t.Error("a reload turned the audit log on")
		}
	}
}
