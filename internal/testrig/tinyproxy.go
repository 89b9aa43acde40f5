package testrig

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

// Tinyproxy is a real tinyproxy egress proxy on loopback.
type Tinyproxy struct {
	Addr string
	cmd  *exec.Cmd
	done chan struct{}

	mu  sync.Mutex
	log bytes.Buffer
}

// TinyproxyOptions configure the proxy.
type TinyproxyOptions struct {
	User, Password string // BasicAuth; empty: none
	ConnectPorts   []int  // CONNECT allowed only to these ports; empty: none allowed
}

type lockedWriter struct{ p *Tinyproxy }

func (w lockedWriter) Write(b []byte) (int, error) {
	w.p.mu.Lock()
	defer w.p.mu.Unlock()
	return w.p.log.Write(b)
}

// StartTinyproxy runs tinyproxy in the foreground with a config in dir.
func StartTinyproxy(dir string, o TinyproxyOptions) (*Tinyproxy, error) {
	bin, err := exec.LookPath("tinyproxy")
	if err != nil {
		return nil, fmt.Errorf("tinyproxy not installed (make deps): %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	var conf strings.Builder
	fmt.Fprintf(&conf, "Port %d\nListen 127.0.0.1\nTimeout 60\nAllow 127.0.0.1\nMaxClients 50\nLogLevel Info\nUser nobody\nGroup nogroup\n", port)
	for _, p := range o.ConnectPorts {
		fmt.Fprintf(&conf, "ConnectPort %d\n", p)
	}
	if len(o.ConnectPorts) == 0 {
		conf.WriteString("ConnectPort 1\n") // an empty list would allow every port
	}
	if o.User != "" {
		fmt.Fprintf(&conf, "BasicAuth %s %s\n", o.User, o.Password)
	}
	path := filepath.Join(dir, fmt.Sprintf("tinyproxy-%d.conf", port))
	if err := os.WriteFile(path, []byte(conf.String()), 0o644); err != nil {
		return nil, err
	}
	p := &Tinyproxy{Addr: fmt.Sprintf("127.0.0.1:%d", port), done: make(chan struct{})}
	p.cmd = exec.Command(bin, "-d", "-c", path)
	p.cmd.Stdout, p.cmd.Stderr = lockedWriter{p}, lockedWriter{p}
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	go func() { p.cmd.Wait(); close(p.done) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", p.Addr)
		if err == nil {
			c.Close()
			return p, nil
		}
		select {
		case <-p.done:
			return nil, fmt.Errorf("tinyproxy exited: %s", p.Log())
		default:
		}
		if time.Now().After(deadline) {
			p.Stop()
			return nil, fmt.Errorf("tinyproxy did not listen on %s", p.Addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Log is what tinyproxy printed so far.
func (p *Tinyproxy) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.log.String()
}

// Stop kills tinyproxy and waits for it.
func (p *Tinyproxy) Stop() {
	p.cmd.Process.Kill()
	<-p.done
}
