package httpx

import (
	"net/url"
	"testing"
)

func TestHostPortDefaultsByScheme(t *testing.T) {
	for in, want := range map[string]string{
		"https://bitbucket.corp":      "bitbucket.corp:443",
		"http://bitbucket.corp/bb":    "bitbucket.corp:80",
		"wss://relay.example.com/v1":  "relay.example.com:443",
		"ws://127.0.0.1":              "127.0.0.1:80",
		"http://proxy.corp:3128":      "proxy.corp:3128",
		"https://[::1]/":              "[::1]:443",
		"http://[fe80::1]:8080/x?q=1": "[fe80::1]:8080",
	} {
		u, err := url.Parse(in)
		if err != nil {
			t.Fatal(err)
		}
		if got := HostPort(u); got != want {
			t.Errorf("HostPort(%s) = %s, want %s", in, got, want)
		}
	}
}
