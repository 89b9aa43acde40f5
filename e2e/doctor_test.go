package e2e

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/agent"
	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func runDoctor(t *testing.T, w *world, yaml string) (bool, string) {
	t.Helper()
	path := w.write("doctor.yaml", yaml)
	var out bytes.Buffer
	ok := agent.Doctor(context.Background(), path, &out)
	return ok, out.String()
}

// line returns the doctor output line for a check.
func line(out, check string) string {
	for _, l := range strings.Split(out, "\n") {
		if len(l) > 2 && strings.HasPrefix(strings.TrimSpace(l[len("✓ "):]), check+" ") {
			return l
		}
	}
	return ""
}

func TestDoctorPassesOnAHealthySetup(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	ok, out := runDoctor(t, w, w.agentYAML(r.AgentAddr(), ""))
	if !ok {
		t.Fatalf("doctor failed on a healthy setup:\n%s", out)
	}
	for _, check := range []string{"config", "dns", "tcp", "tls", "relay", "upstream bitbucket", "credential bitbucket", "audit log"} {
		if l := line(out, check); !strings.HasPrefix(l, "✓") {
			t.Errorf("check %s: %q\n%s", check, l, out)
		}
	}
	if !strings.Contains(line(out, "relay"), "tunnel "+tunnelID) || !strings.Contains(line(out, "credential bitbucket"), "svc-ferry") ||
		!strings.Contains(line(out, "credential bitbucket"), "days") || !strings.Contains(out, "all 8 checks passed") ||
		!strings.Contains(line(out, "audit log"), "MiB free") {
		t.Errorf("doctor output lacks detail:\n%s", out)
	}
	// An audit log sent to a device: written, never rotated, no disk to
	// judge.
	ok, out = runDoctor(t, w, strings.Replace(w.agentYAML(r.AgentAddr(), ""), filepath.Join(w.dir, "audit.jsonl"), os.DevNull, 1))
	if l := line(out, "audit log"); !ok || l != "✓ audit log              "+os.DevNull+" is a device: the lines are written to it, never rotated" {
		t.Errorf("audit log to %s: %q\n%s", os.DevNull, l, out)
	}
}

func TestDoctorDiagnoses(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	good := w.agentYAML(r.AgentAddr(), "")
	otherPKI, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	dead := listenLocal(t)
	deadAddr := dead.Addr().String()
	dead.Close()
	refusing, err := testrig.StartTinyproxy(w.dir, testrig.TinyproxyOptions{ConnectPorts: []int{relayPort(t, r.AgentAddr()) + 1}})
	if err != nil {
		t.Fatal(err)
	}
	defer refusing.Stop()

	cases := []struct {
		name, yaml, check string
		want              []string
		setup             func()
	}{
		{"wrong token", good, "relay", []string{"401", "relay-token"}, func() { w.write("relay-token", "fry_wrong") }},
		{"bad CA", strings.Replace(good, "ca_file: "+w.pki.CAFile+"\n  connections", "ca_file: "+otherPKI.CAFile+"\n  connections", 1), "tls", []string{"unknown authority", "relay.ca_file"}, nil},
		{"relay unreachable", strings.Replace(good, r.AgentAddr(), deadAddr, 1), "tcp", []string{"connection refused", "firewall"}, nil},
		{"proxy refusing", strings.Replace(good, "  connections: 2\n", "  connections: 2\n  proxy_url: http://"+refusing.Addr+"\n", 1), "tcp", []string{"403", "does not allow CONNECT"}, nil},
		{"bad PAT", good, "credential bitbucket", []string{"401", "not accepted", filepath.Join(w.dir, "pat")}, func() { w.write("pat", "expired-pat") }},
		{"upstream unreachable", strings.Replace(good, w.bbURL, "https://"+deadAddr, 1), "upstream bitbucket", []string{"cannot connect"}, nil},
		{"bad config", strings.Replace(good, "profile:", "profle:", 1), "config", []string{"profle", "unknown field"}, nil},
		{"audit directory missing", strings.Replace(good, "audit.jsonl", "missing/audit.jsonl", 1), "audit log", []string{"no such file", "LogsDirectory"}, nil},
		{"audit disk too small", strings.Replace(good, "audit: {path:", "audit: {max_size_mb: 1000000000, path:", 1), "audit log", []string{"less than one file", "audit.max_size_mb"}, nil},
	}
	for _, c := range cases {
		w.write("relay-token", agentToken)
		w.write("pat", bitbucketPAT)
		if c.setup != nil {
			c.setup()
		}
		ok, out := runDoctor(t, w, c.yaml)
		l := line(out, c.check)
		if ok || !strings.HasPrefix(l, "✗") {
			t.Errorf("%s: check %s not failed:\n%s", c.name, c.check, out)
			continue
		}
		// The hint is on the next line; judge the failure and its hint together.
		after := out[strings.Index(out, l):]
		for _, want := range c.want {
			if !strings.Contains(after, want) {
				t.Errorf("%s: %q missing from:\n%s", c.name, want, after)
			}
		}
	}
}

func TestDoctorExitCode(t *testing.T) {
	_, agentBin := binaries(t)
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	cfg := w.write("agent.yaml", w.agentYAML(r.AgentAddr(), ""))
	if out, err := exec.Command(agentBin, "doctor", "--config", cfg).CombinedOutput(); err != nil {
		t.Fatalf("healthy: %v\n%s", err, out)
	}
	w.write("relay-token", "fry_wrong")
	out, err := exec.Command(agentBin, "doctor", "--config", cfg).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(string(out), "✗ relay") {
		t.Fatalf("wrong token: %v\n%s", err, out)
	}
}

func TestDoctorChecksTheWebhookSpool(t *testing.T) {
	w := newWorld(t)
	r, rrun := w.startRelay("127.0.0.1:0")
	defer rrun.shutdown(t)
	w.write("hook-secret", "s3cret")
	spoolDir := filepath.Join(w.dir, "spool")
	yaml := w.agentYAML(r.AgentAddr(), "webhooks: {listen: \"127.0.0.1:0\", secret_file: "+filepath.Join(w.dir, "hook-secret")+", spool_dir: "+spoolDir+"}\n")
	ok, out := runDoctor(t, w, yaml)
	if !ok || !strings.HasPrefix(line(out, "webhook spool"), "✓") || !strings.Contains(line(out, "webhook spool"), "0 deliveries waiting") ||
		!strings.HasPrefix(line(out, "webhook secret"), "✓") {
		t.Fatalf("healthy webhook setup:\n%s", out)
	}
	// A delivery stuck for two hours means something downstream refuses it.
	stuck := filepath.Join(spoolDir, "0000000000000001-wh-aaaaaaaaaaaaaaaaaaaaaaaa.delivery")
	if err := os.WriteFile(stuck, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	old := time.Now().Add(-2 * time.Hour)
	os.Chtimes(stuck, old, old)
	ok, out = runDoctor(t, w, yaml)
	if l := line(out, "webhook spool"); ok || !strings.HasPrefix(l, "✗") || !strings.Contains(l, "1 deliveries waiting") || !strings.Contains(out, "last_error") {
		t.Fatalf("stuck delivery not reported:\n%s", out)
	}
	os.Remove(stuck)
	os.MkdirAll(filepath.Join(spoolDir, "quarantine"), 0o700)
	if err := os.WriteFile(filepath.Join(spoolDir, "quarantine", "bad.delivery"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	ok, out = runDoctor(t, w, yaml)
	if l := line(out, "webhook spool"); ok || !strings.Contains(l, "1 quarantined") || !strings.Contains(out, "inspect them") {
		t.Fatalf("quarantined file not reported:\n%s", out)
	}
}
