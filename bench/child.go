package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
)

// child is a helper process of the bench (the upstream, the reference
// tunnels' ends): the bench binary run again with a role's flag. It
// prints "listening ADDR" once it listens, and stops when its stdin
// closes, so it also goes away when the bench is killed.
type child struct {
	cmd  *exec.Cmd
	in   io.WriteCloser
	addr string // host:port it listens on
}

// startChild runs the bench binary with args and waits for the address
// the child listens on.
func startChild(args ...string) (*child, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("find the bench binary: %w", err)
	}
	c := &child{cmd: exec.Command(self, args...)}
	c.cmd.Stderr = os.Stderr
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if c.in, err = c.cmd.StdinPipe(); err != nil {
		return nil, err
	}
	if err := c.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", args[0], err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	addr, ok := strings.CutPrefix(strings.TrimSpace(line), "listening ")
	if err != nil || !ok {
		c.stop()
		return nil, fmt.Errorf("%s did not start (read %q: %v)", args[0], line, err)
	}
	c.addr = addr
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// stop closes the child's stdin and waits for it to exit.
func (c *child) stop() {
	if c == nil {
		return
	}
	c.in.Close()
	c.cmd.Wait()
}

// announce prints the address a child listens on, for its parent, and
// returns a channel closed when the parent closes the child's stdin.
func announce(addr string) <-chan struct{} {
	fmt.Printf("listening %s\n", addr)
	gone := make(chan struct{})
	go func() {
		io.Copy(io.Discard, os.Stdin)
		close(gone)
	}()
	return gone
}
