package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The commented examples in configs/ must stay valid: they are what
// operators copy. File paths are pointed at real files first.
func TestExampleConfigsParse(t *testing.T) {
	dir := t.TempDir()
	cert, key := writeTestCert(t, dir)
	relay, err := os.ReadFile("../../configs/relay.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	r := strings.NewReplacer("/etc/ferry/tls/relay.crt", cert, "/etc/ferry/tls/relay.key", key).Replace(string(relay))
	if _, err := ParseRelay("relay.example.yaml", []byte(r)); err != nil {
		t.Fatal(err)
	}
	agent, err := os.ReadFile("../../configs/agent.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "relay-token", "tok")
	writeFile(t, dir, "bitbucket-pat", "pat")
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	writeFile(t, dir, "webhook-secret", "hook")
	a := strings.Replace(string(agent), "/var/log/ferry/audit.jsonl", filepath.Join(dir, "audit.jsonl"), 1)
	a = strings.ReplaceAll(a, "\n#webhooks:", "\nwebhooks:")
	a = strings.ReplaceAll(a, "\n#  ", "\n  ")
	a = strings.Replace(a, "/var/lib/ferry/spool", filepath.Join(dir, "spool"), 1)
	a = strings.NewReplacer("/etc/ferry/hook.pem", cert, "/etc/ferry/hook.key", key).Replace(a)
	cfg, err := ParseAgent("agent.example.yaml", []byte(a))
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Webhooks.Enabled() || cfg.Webhooks.Secret == nil || cfg.Webhooks.Lanes != 4 || cfg.Webhooks.TLS == nil {
		t.Fatalf("the commented webhooks example did not parse as written: %+v", cfg.Webhooks)
	}
}
