package config

import (
	"errors"
	"os"
	"strings"
	"testing"
)

// Whatever a config file holds, parsing it either succeeds or refuses it
// with a config error of one line naming the file: never a panic, never
// another kind of error (which would exit 1 instead of 2).
func FuzzParseConfig(f *testing.F) {
	dir := f.TempDir()
	f.Add([]byte(relayYAML()))
	f.Add([]byte(agentYAML(dir)))
	f.Add([]byte(relayYAML() + "registry: {backend: redis, redis_url: \"redis://redis:6379/0\", advertise_url: \"http://${POD_IP}:7443\"}\n"))
	f.Add([]byte("relay: {url: wss://r, token_file: ${CREDENTIALS_DIRECTORY}/t}\n"))
	f.Add([]byte("a: &a [*a, *a]\nb: *a\n"))
	f.Add([]byte("upstreams: [null, ~, {}]\ntunnels: [null]\nscanners: [{}]\n"))
	f.Add([]byte("--- \n...\n---\n"))
	for _, p := range []string{"../../configs/relay.example.yaml", "../../configs/agent.example.yaml"} {
		data, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for _, parse := range []func(string, []byte) (any, error){
			func(file string, data []byte) (any, error) { return ParseRelay(file, data) },
			func(file string, data []byte) (any, error) { return ParseAgent(file, data) },
		} {
			cfg, err := parse("fuzz.yaml", data)
			if err == nil {
				if cfg == nil {
					t.Fatal("no error and no config")
				}
				continue
			}
			var ce *Error
			if !errors.As(err, &ce) {
				t.Fatalf("%T is not a config error: %v", err, err)
			}
			msg := err.Error()
			if !strings.HasPrefix(msg, "fuzz.yaml") || strings.ContainsAny(msg, "\r\n") || ce.Msg == "" {
				t.Fatalf("config error is not one line naming the file: %q", msg)
			}
		}
	})
}
