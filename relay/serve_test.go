package relay

import (
	"context"
	"testing"
	"time"

	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/token"
)

// A listener that fails ends Serve with its error, instead of leaving the
// relay half up.
func TestServeReturnsWhenAListenerFails(t *testing.T) {
	cfg, err := config.ParseRelay("relay.yaml", []byte(`agent_listen: "127.0.0.1:0"
insecure_plaintext: true
scanner_listen: "127.0.0.1:0"
admin_listen: "127.0.0.1:0"
timeouts: {shutdown_grace: 1s}
tunnels: [{id: t, agent_tokens: ["`+token.Of("a").String()+`"]}]
`))
	if err != nil {
		t.Fatal(err)
	}
	r, err := New(cfg, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Listen(); err != nil {
		t.Fatal(err)
	}
	r.adminLn.Close() // the admin listener dies under the relay
	done := make(chan error, 1)
	go func() { done <- r.Serve(context.Background()) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Serve returned no error for a failed listener")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve hung after a listener failed")
	}
}
