package testrig

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"sync"
)

// StableAddr is a free loopback address for a server that must come back
// on the same address after a restart (a relay killed and started again,
// redis restarted under a relay). The port is below the kernel's
// ephemeral range: a port the kernel handed out for ":0" is also one it
// may hand to the next outgoing connection, which then holds it while
// the server is down and the restart fails with "address already in use".
//
// A port is handed out once per process: it is free when checked, but
// its server binds it later, and a second caller meanwhile (two replicas
// of one test, each port picked at random from some 20,000: about one
// full test run in a hundred) would get it too, and one of the two would
// fail to start with "address already in use".
func StableAddr() (string, error) {
	low := ephemeralLow()
	const floor = 10000
	if low <= floor+1000 {
		return "", fmt.Errorf("ephemeral port range starts at %d: no room below it for fixed test ports", low)
	}
	for range 200 {
		port := floor + rand.IntN(low-floor)
		if !handedOut.take(port) {
			continue
		}
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue // taken by another test or service; try another
		}
		addr := ln.Addr().String()
		ln.Close()
		return addr, nil
	}
	return "", errors.New("no free loopback port below the ephemeral range after 200 tries")
}

// handedOut is the ports StableAddr gave in this process. Package-level
// on purpose: the ports are the process's (the machine's, in truth), not
// any one caller's.
var handedOut = portSet{ports: map[int]bool{}}

type portSet struct {
	mu    sync.Mutex
	ports map[int]bool
}

// take reports whether port was not taken before, and takes it.
func (s *portSet) take(port int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ports[port] {
		return false
	}
	s.ports[port] = true
	return true
}

// ephemeralLow is the first port the kernel uses for outgoing connections
// (Linux's default 32768 where the setting cannot be read).
func ephemeralLow() int {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &low) // "32768\t60999"; on failure low keeps the default
	}
	return low
}
