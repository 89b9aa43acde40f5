package testrig

import (
	"fmt"
	"io"
	"net"
	"os/exec"
	"sync"
	"time"
)

// Redis is a real redis-server on loopback, without persistence, that a
// test can stop and start again on the same port.
type Redis struct {
	Addr  string
	dir   string
	extra []string // more redis-server options

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
}

// StartRedis runs redis-server on a free loopback port it can be
// restarted on; extra are more redis-server options (e.g. a hardened
// server's "--rename-command", "TIME", "").
func StartRedis(dir string, extra ...string) (*Redis, error) {
	addr, err := StableAddr()
	if err != nil {
		return nil, err
	}
	r := &Redis{Addr: addr, dir: dir, extra: extra}
	return r, r.Start()
}

// URL is the redis:// URL of the server.
func (r *Redis) URL() string { return "redis://" + r.Addr + "/0" }

// Start (re)starts the server on its port and waits until it answers.
func (r *Redis) Start() error {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return fmt.Errorf("redis-server not installed (make deps): %w", err)
	}
	_, port, _ := net.SplitHostPort(r.Addr)
	cmd := exec.Command(bin, append([]string{"--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly", "no",
		"--dir", r.dir, "--protected-mode", "yes", "--loglevel", "warning"}, r.extra...)...)
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	r.mu.Lock()
	r.cmd, r.done = cmd, done
	r.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", r.Addr)
		if err == nil {
			c.Write([]byte("PING\r\n"))
			buf := make([]byte, 7)
			c.SetReadDeadline(time.Now().Add(time.Second))
			n, _ := io.ReadFull(c, buf)
			c.Close()
			if string(buf[:n]) == "+PONG\r\n" {
				return nil
			}
		}
		select {
		case <-done:
			return fmt.Errorf("redis-server exited at start (port %s taken?)", port)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			r.Stop()
			return fmt.Errorf("redis-server did not answer on %s in 10s", r.Addr)
		}
	}
}

// Stop kills the server (SIGKILL: like a crash, nothing saved).
func (r *Redis) Stop() {
	r.mu.Lock()
	cmd, done := r.cmd, r.done
	r.cmd = nil
	r.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Kill()
	<-done
}

// Balancer is a TCP load balancer on loopback, round robin over backends,
// like a cloud load balancer in front of relay replicas.
type Balancer struct {
	Addr string
	ln   net.Listener

	mu       sync.Mutex
	backends []string
	next     int
	conns    map[net.Conn]bool
	wg       sync.WaitGroup
}

// StartBalancer listens on a free loopback port.
func StartBalancer(backends ...string) (*Balancer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	b := &Balancer{Addr: ln.Addr().String(), ln: ln, backends: backends, conns: map[net.Conn]bool{}}
	b.wg.Add(1)
	go b.serve()
	return b, nil
}

func (b *Balancer) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			b.pipe(c)
		}()
	}
}

// pipe connects c to the next backend that accepts a connection.
func (b *Balancer) pipe(c net.Conn) {
	defer c.Close()
	var up net.Conn
	for range len(b.backends) {
		b.mu.Lock()
		target := b.backends[b.next%len(b.backends)]
		b.next++
		b.mu.Unlock()
		var err error
		if up, err = net.DialTimeout("tcp", target, time.Second); err == nil {
			break
		}
	}
	if up == nil {
		return
	}
	defer up.Close()
	if !b.track(c, up) {
		return
	}
	defer b.untrack(c, up)
	done := make(chan struct{}, 2)
	go func() { io.Copy(up, c); up.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(c, up); c.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
}

func (b *Balancer) track(cs ...net.Conn) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conns == nil {
		return false
	}
	for _, c := range cs {
		b.conns[c] = true
	}
	return true
}

func (b *Balancer) untrack(cs ...net.Conn) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, c := range cs {
		delete(b.conns, c)
	}
}

// Close stops the balancer and cuts its connections.
func (b *Balancer) Close() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.conns = nil
	b.mu.Unlock()
	b.wg.Wait()
}
