package agent

import (
	"net/url"
	"testing"

	"github.com/ferry-tunnel/ferry/internal/config"
)

func TestRelayProxyHonoursEnvironment(t *testing.T) {
	t.Setenv("HTTPS_PROXY", "http://user:pw@proxy.corp.example:3128")
	t.Setenv("NO_PROXY", ".corp.example,10.0.0.0/8")
	f, err := relayProxy(&config.RelayClient{})
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		"https://relay.example.com/v1/connect":  "http://user:pw@proxy.corp.example:3128",
		"https://relay.corp.example/v1/connect": "",
		"https://10.1.2.3/v1/connect":           "",
	}
	for target, want := range cases {
		u, _ := url.Parse(target)
		got, err := f(u)
		if err != nil {
			t.Fatal(err)
		}
		if (got == nil && want != "") || (got != nil && got.String() != want) {
			t.Errorf("%s: proxy %v, want %q", target, got, want)
		}
	}
	// proxy_url wins over the environment.
	f, _ = relayProxy(&config.RelayClient{ProxyURL: "http://explicit:8080"})
	u, _ := url.Parse("https://relay.corp.example")
	if got, _ := f(u); got == nil || got.Host != "explicit:8080" {
		t.Errorf("proxy_url not used: %v", got)
	}
}
