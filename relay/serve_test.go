package relay

import (
	"context"
	"testing"
	"time"
)

// A listener that fails ends Serve with its error, instead of leaving the
// relay half up.
func TestServeReturnsWhenAListenerFails(t *testing.T) {
	r := newPlainRelay(t, "shutdown_grace: 1s")
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
