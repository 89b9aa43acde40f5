package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/token"
)

func writeFile(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

var (
	agentHash   = token.Of("agent-token").String()
	scannerHash = token.Of("scanner-token").String()
)

func relayYAML() string {
	return `agent_listen: "127.0.0.1:0"
insecure_plaintext: true
scanner_listen: "127.0.0.1:0"
tunnels:
  - id: acme-bbdc
    agent_tokens: ["` + agentHash + `"]
scanners:
  - name: appsec
    token: "` + scannerHash + `"
    tunnels: [acme-bbdc]
`
}

func TestRelayValid(t *testing.T) {
	c, err := ParseRelay("relay.yaml", []byte(relayYAML()))
	if err != nil {
		t.Fatal(err)
	}
	if c.AdminListen != "127.0.0.1:9090" || c.Registry.Backend != "memory" || c.Log.Level != "info" {
		t.Fatalf("defaults not applied: %+v", c)
	}
	if c.Tunnels[0].AgentHashes[0] != token.Of("agent-token") || c.Scanners[0].Hash != token.Of("scanner-token") {
		t.Fatal("hashes not parsed")
	}
}

func TestRelayErrorsNameFileLineField(t *testing.T) {
	cases := []struct {
		name, yaml string
		want       []string
	}{
		{"unknown field", strings.Replace(relayYAML(), "scanner_listen", "scaner_listen", 1), []string{"relay.yaml:3", "scaner_listen", "unknown field"}},
		{"nested unknown", strings.Replace(relayYAML(), "    tunnels: [acme-bbdc]", "    tunnels: [acme-bbdc]\n    colour: red", 1), []string{"relay.yaml:11", "colour"}},
		{"bad hash", strings.Replace(relayYAML(), agentHash, "sha256:abc", 1), []string{"relay.yaml:6", "tunnels[0].agent_tokens[0]", "64 lowercase hex"}},
		{"unknown tunnel", strings.Replace(relayYAML(), "[acme-bbdc]", "[nope]", 1), []string{"scanners[0].tunnels[0]", `"nope"`}},
		{"no tls", strings.Replace(relayYAML(), "insecure_plaintext: true", "", 1), []string{"tls", "required"}},
		{"bad listen", strings.Replace(relayYAML(), `"127.0.0.1:0"`, `"localhost"`, 1), []string{"agent_listen", "host:port"}},
		{"type", strings.Replace(relayYAML(), "insecure_plaintext: true", "insecure_plaintext: maybe", 1), []string{"relay.yaml:2", "bool"}},
		{"shared token", strings.Replace(relayYAML(), scannerHash, agentHash, 1), []string{"scanners[0].token", "agent token"}},
		{"scanner max_streams", strings.Replace(relayYAML(), "    tunnels: [acme-bbdc]", "    tunnels: [acme-bbdc]\n    max_streams: -3", 1), []string{"scanners[0].max_streams", "0-1000000"}},
		{"redis url", relayYAML() + "registry: {backend: redis, advertise_url: \"http://10.0.0.5:7443\"}\n", []string{"registry.redis_url", "required"}},
		{"redis bad url", relayYAML() + "registry: {backend: redis, redis_url: \"http://x\", advertise_url: \"http://10.0.0.5:7443\"}\n", []string{"registry.redis_url"}},
		{"advertise", relayYAML() + "registry: {backend: redis, redis_url: \"redis://r:6379\"}\n", []string{"registry.advertise_url", "required"}},
		{"advertise env", relayYAML() + "registry: {backend: redis, redis_url: \"redis://r:6379\", advertise_url: \"http://${FERRY_TEST_UNSET_VAR}:7443\"}\n", []string{"registry.advertise_url", "FERRY_TEST_UNSET_VAR", "not set"}},
		{"advertise any", relayYAML() + "registry: {backend: redis, redis_url: \"redis://r:6379\", advertise_url: \"http://0.0.0.0:7443\"}\n", []string{"registry.advertise_url", "reach"}},
		{"advertise path", relayYAML() + "registry: {backend: redis, redis_url: \"redis://r:6379\", advertise_url: \"http://10.0.0.5:7443/x\"}\n", []string{"registry.advertise_url", "HOST:PORT"}},
		{"redis fields on memory", relayYAML() + "registry: {redis_url: \"redis://r:6379\"}\n", []string{"registry.backend", "need backend: redis"}},
		{"webhook token without target", strings.Replace(relayYAML(), "    agent_tokens:", "    webhook_token_file: /etc/ferry/hook-token\n    agent_tokens:", 1), []string{"tunnels[0].webhook_token_file", "webhook_target, which is not set"}},
		{"webhook token missing", strings.Replace(relayYAML(), "    agent_tokens:", "    webhook_target: https://hooks.example/x\n    webhook_token_file: /nonexistent/hook-token\n    agent_tokens:", 1), []string{"tunnels[0].webhook_token_file", "/nonexistent/hook-token", "no such file"}},
		{"two docs", relayYAML() + "---\na: 1\n", []string{"more than one YAML document"}},
		{"empty", "", []string{"empty"}},
	}
	for _, c := range cases {
		_, err := ParseRelay("relay.yaml", []byte(c.yaml))
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		if !IsConfigError(err) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%s: not a one-line config error: %q", c.name, err)
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q does not mention %q", c.name, err, w)
			}
		}
	}
}

func agentYAML(dir string) string {
	return `relay:
  url: wss://relay.example.com
  token_file: ` + filepath.Join(dir, "relay-token") + `
upstreams:
  - name: bitbucket
    url: https://bitbucket.internal:7990/
    auth: {type: bearer, token_file: "${CREDENTIALS_DIRECTORY}/pat"}
    profile: bitbucket-dc-read
    repositories: ["PROJ/*"]
    rules:
      - {methods: [GET], path: "/rest/foo/**"}
`
}

func TestRelayRedisRegistry(t *testing.T) {
	t.Setenv("POD_IP", "10.1.2.3")
	c, err := ParseRelay("relay.yaml", []byte(relayYAML()+"registry: {backend: redis, redis_url: \"redis://redis:6379/0\", advertise_url: \"http://${POD_IP}:7443\"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.Registry.AdvertiseURL != "http://10.1.2.3:7443" || c.Registry.InternalListen != "10.1.2.3:7443" || c.Registry.PeerSecret != nil {
		t.Fatalf("registry: %+v", c.Registry)
	}
	c, err = ParseRelay("relay.yaml", []byte(relayYAML()+"registry: {backend: redis, redis_url: \"redis://redis:6379/0\", advertise_url: \"http://${POD_IP}:7443\", internal_listen: \":7443\"}\n"))
	if err != nil || c.Registry.InternalListen != ":7443" {
		t.Fatalf("internal_listen: %v %+v", err, c.Registry)
	}

	// peer_secret_file: one long secret, or two during a rotation.
	dir := t.TempDir()
	withSecret := func(body string) (*Relay, error) {
		p := writeFile(t, dir, "peer", body)
		return ParseRelay("relay.yaml", []byte(relayYAML()+"registry: {backend: redis, redis_url: \"redis://redis:6379/0\", advertise_url: \"http://10.1.2.3:7443\", peer_secret_file: \""+p+"\"}\n"))
	}
	c, err = withSecret("new-peer-secret-0123\nold-peer-secret-0123\n")
	if err != nil {
		t.Fatal(err)
	}
	if vs, _ := c.Registry.PeerSecret.Values(); len(vs) != 2 || vs[0] != "new-peer-secret-0123" {
		t.Fatalf("two-line peer secret: %q", vs)
	}
	for body, want := range map[string]string{
		"s3cret\n": "registry.peer_secret_file: secret file " + dir + "/peer: line 1: 6 characters is too short, at least 16",
		"aaaaaaaaaaaaaaaa\nbbbbbbbbbbbbbbbb\ncccccccccccccccc\n": "3 secrets, at most 2 (one per line)",
	} {
		if _, err := withSecret(body); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("peer secret %q: %v, want %q", body, err, want)
		}
	}
}

func TestAgentValid(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "relay-token", "tok\n")
	writeFile(t, dir, "pat", "pat\n")
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	c, err := ParseAgent("agent.yaml", []byte(agentYAML(dir)))
	if err != nil {
		t.Fatal(err)
	}
	if c.Relay.URL != "wss://relay.example.com/v1/connect" || c.Relay.Connections != 2 || c.Diagnostics.Listen != "127.0.0.1:9091" {
		t.Fatalf("defaults: %+v", c.Relay)
	}
	u := c.Upstreams[0]
	if u.URL != "https://bitbucket.internal:7990" || u.Policy == nil || u.Auth.TokenFile != filepath.Join(dir, "pat") {
		t.Fatalf("upstream: %+v", u)
	}
	// No bound of the agent's own by default; the wait, with the default
	// response_timeout, stays within the relay's 150 s for headers.
	if u.MaxConcurrentRequests != 0 || u.MaxQueueWait+u.ResponseTimeout > 150*time.Second {
		t.Fatalf("concurrency defaults: %d, wait %v + response %v", u.MaxConcurrentRequests, u.MaxQueueWait, u.ResponseTimeout)
	}
	if v, _ := u.Auth.Secret.Value(); v != "pat" {
		t.Fatalf("secret %q", v)
	}
}

func TestAgentErrors(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "relay-token", "tok\n")
	writeFile(t, dir, "pat", "pat\n")
	t.Setenv("CREDENTIALS_DIRECTORY", dir)
	base := agentYAML(dir)
	cases := []struct {
		name, yaml string
		want       []string
	}{
		{"scheme", strings.Replace(base, "wss://", "https://", 1), []string{"relay.url", "scheme"}},
		{"profile", strings.Replace(base, "bitbucket-dc-read", "bitbucket-dc-all", 1), []string{"upstreams[0].profile", "unknown profile"}},
		{"rule method", strings.Replace(base, "[GET]", "[FETCH]", 1), []string{"upstreams[0].rules[0]", "FETCH"}},
		{"missing pat", strings.Replace(base, "/pat\"}", "/nope\"}", 1), []string{"upstreams[0].auth.token_file", "no such file"}},
		{"auth type", strings.Replace(base, "type: bearer", "type: ntlm", 1), []string{"upstreams[0].auth.type"}},
		{"scope", strings.Replace(base, `"PROJ/*"`, `"PROJ"`, 1), []string{"upstreams[0].repositories"}},
		{"concurrency", strings.Replace(base, "profile:", "max_concurrent_requests: -1\n    profile:", 1), []string{"upstreams[0].max_concurrent_requests", "0-100000"}},
		{"queue wait", strings.Replace(base, "profile:", "max_queue_wait: 1h\n    profile:", 1), []string{"upstreams[0].max_queue_wait", "out of range"}},
		{"connections", strings.Replace(base, "url: wss", "connections: 99\n  url: wss", 1), []string{"relay.connections"}},
		{"unknown", strings.Replace(base, "profile:", "profle:", 1), []string{"agent.yaml:8", "profle", "unknown field"}},
		{"webhooks no listen", base + "webhooks: {spool_dir: /tmp/x}\n", []string{"webhooks.listen", "required"}},
		{"webhooks no spool", base + "webhooks: {listen: \":8181\"}\n", []string{"webhooks.spool_dir", "persistent"}},
		{"webhooks tls without key", base + "webhooks: {listen: \":8181\", spool_dir: /tmp/x, tls: {cert_file: /etc/hostname}}\n", []string{"webhooks.tls", "both cert_file and key_file"}},
		{"webhooks tls unloadable", base + "webhooks: {listen: \":8181\", spool_dir: /tmp/x, tls: {cert_file: /etc/hostname, key_file: /etc/hostname}}\n", []string{"webhooks.tls", "cannot load certificate"}},
		{"webhooks secret", base + "webhooks: {listen: \":8181\", spool_dir: /tmp/x, secret_file: /nonexistent/s}\n", []string{"webhooks.secret_file"}},
		{"webhooks lanes", base + "webhooks: {listen: \":8181\", spool_dir: /tmp/x, lanes: 100}\n", []string{"webhooks.lanes", "1-16"}},
		{"audit to a directory", base + "audit: {path: " + dir + "}\n", []string{"audit.path", dir + " is a directory, not a regular file", `"-" writes the lines to standard output`}},
		{"ca bundle a directory", strings.Replace(base, "profile:", "ca_file: /etc\n    profile:", 1), []string{"upstreams[0].ca_file", "is a directory, not a regular file"}},
		{"pat a device", strings.Replace(base, "${CREDENTIALS_DIRECTORY}/pat", "/dev/zero", 1), []string{"upstreams[0].auth.token_file", "/dev/zero: is a character device"}},
	}
	for _, c := range cases {
		_, err := ParseAgent("agent.yaml", []byte(c.yaml))
		if err == nil {
			t.Errorf("%s: accepted", c.name)
			continue
		}
		for _, w := range c.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: %q does not mention %q", c.name, err, w)
			}
		}
	}
	t.Setenv("CREDENTIALS_DIRECTORY", "")
	if _, err := ParseAgent("agent.yaml", []byte(base)); err == nil || !strings.Contains(err.Error(), "CREDENTIALS_DIRECTORY") {
		t.Errorf("unset CREDENTIALS_DIRECTORY: %v", err)
	}
}

func TestUnquotedCredentialsDirHint(t *testing.T) {
	_, err := ParseAgent("agent.yaml", []byte("upstreams:\n  - name: b\n    auth: {type: bearer, token_file: ${CREDENTIALS_DIRECTORY}/pat}\n"))
	if err == nil || !strings.Contains(err.Error(), "hint: quote") || !strings.Contains(err.Error(), "agent.yaml:") {
		t.Fatalf("got %v", err)
	}
}
