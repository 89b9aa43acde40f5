package testrig

import (
	"net"
	"strconv"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestStableAddrIsBelowTheEphemeralRangeAndFree(t *testing.T) {
	low := ephemeralLow()
	for range 20 {
		addr, err := StableAddr()
		if err != nil {
			t.Fatal(err)
		}
		_, p, _ := net.SplitHostPort(addr)
		port, _ := strconv.Atoi(p)
		if port >= low || port < 10000 {
			t.Fatalf("port %d outside [10000, %d)", port, low)
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			t.Fatalf("StableAddr gave %s, which cannot be listened on: %v", addr, err)
		}
		ln.Close()
	}
}

// Two servers of one test must not get the same port: the first to bind
// it would make the second fail to start.
func TestStableAddrNeverRepeats(t *testing.T) {
	seen := map[string]bool{}
	for range 500 { // at random, a repeat in 500 of ~20,000 ports is near certain
		addr, err := StableAddr()
		if err != nil {
			t.Fatal(err)
		}
		if seen[addr] {
			t.Fatalf("StableAddr gave %s twice", addr)
		}
		seen[addr] = true
	}
}
