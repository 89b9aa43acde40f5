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
