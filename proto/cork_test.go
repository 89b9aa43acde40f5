package proto

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"testing"
	"time"
)

// writeLog records each Write its conn receives, as a syscall would see it.
type writeLog struct {
	net.Conn
	writes [][]byte
}

func (w *writeLog) Write(p []byte) (int, error) {
	w.writes = append(w.writes, bytes.Clone(p))
	return len(p), nil
}

func TestCorkHoldsWritesUntilUncork(t *testing.T) {
	raw := &writeLog{}
	c := NewCorkConn(raw)
	c.Write([]byte("handshake"))
	if len(raw.writes) != 1 {
		t.Fatalf("uncorked write was held: %d writes", len(raw.writes))
	}
	c.Cork()
	for i := 0; i < 64; i++ {
		c.Write(bytes.Repeat([]byte{byte(i)}, 4096))
	}
	if len(raw.writes) != 1 {
		t.Fatalf("corked writes went out: %d writes", len(raw.writes))
	}
	// Past 256 KiB held, what is held goes out in one write.
	for i := 64; i < 100; i++ {
		c.Write(bytes.Repeat([]byte{byte(i)}, 4096))
	}
	if len(raw.writes) != 2 || len(raw.writes[1]) != corkMax {
		t.Fatalf("held writes past the bound: %d writes", len(raw.writes))
	}
	if err := c.Uncork(); err != nil {
		t.Fatal(err)
	}
	if len(raw.writes) != 3 {
		t.Fatalf("100 corked 4 KiB writes left as %d writes, want 2", len(raw.writes)-1)
	}
	got := append(raw.writes[1], raw.writes[2]...)
	for i := 0; i < 100; i++ {
		if !bytes.Equal(got[i*4096:(i+1)*4096], bytes.Repeat([]byte{byte(i)}, 4096)) {
			t.Fatalf("write %d out of order or altered", i)
		}
	}
	c.Write([]byte("after"))
	if len(raw.writes) != 4 {
		t.Fatal("write after Uncork was held")
	}
}

func TestCorkLargeWriteKeepsOrder(t *testing.T) {
	raw := &writeLog{}
	c := NewCorkConn(raw)
	c.Cork()
	c.Write([]byte("small"))
	big := bytes.Repeat([]byte("x"), corkMax+1)
	c.Write(big)
	if len(raw.writes) != 2 || string(raw.writes[0]) != "small" || !bytes.Equal(raw.writes[1], big) {
		t.Fatalf("held bytes must go before an oversize write: %d writes", len(raw.writes))
	}
	if err := c.Uncork(); err != nil || len(raw.writes) != 2 {
		t.Fatalf("nothing was left to send: %v, %d writes", err, len(raw.writes))
	}
}

// A cork above another (above and beneath TLS): the slot uncorks the
// outer one first, so what it releases is still held by the inner one and
// the whole batch leaves in one write.
func TestStackedCorksLeaveAsOneWrite(t *testing.T) {
	raw := &writeLog{}
	inner := NewCorkConn(raw)
	outer := NewCork(inner)
	slot := &CorkSlot{}
	slot.Add(inner) // added in the order a dial makes them
	slot.Add(outer)
	slot.Add((*CorkConn)(nil)) // none found: ignored
	c := slot.Corker()
	c.Cork()
	for _, p := range []string{"frame one,", "frame two,", "frame three"} {
		outer.Write([]byte(p))
	}
	if len(raw.writes) != 0 {
		t.Fatalf("%d writes left while corked", len(raw.writes))
	}
	if err := c.Uncork(); err != nil {
		t.Fatal(err)
	}
	if len(raw.writes) != 1 || string(raw.writes[0]) != "frame one,frame two,frame three" {
		t.Fatalf("batch left in %d writes: %q", len(raw.writes), raw.writes)
	}
	if (&CorkSlot{}).Corker() != nil {
		t.Fatal("an empty slot must give no corker (nil, so the batcher skips it)")
	}
}

// Above TLS, a write of a full record or more is not copied into the
// cork: what is held goes first, then the write, in order.
func TestCorkPassesFullRecords(t *testing.T) {
	raw := &writeLog{}
	c := NewCork(raw)
	c.Cork()
	c.Write([]byte("frame header"))
	big := bytes.Repeat([]byte("y"), 20<<10)
	c.Write(big)
	if len(raw.writes) != 2 || string(raw.writes[0]) != "frame header" || !bytes.Equal(raw.writes[1], big) {
		t.Fatalf("want the held header, then the full-record write: %d writes", len(raw.writes))
	}
	c.Write([]byte("small"))
	if len(raw.writes) != 2 {
		t.Fatal("a small write after it was not held")
	}
	if err := c.Uncork(); err != nil || len(raw.writes) != 3 || string(raw.writes[2]) != "small" {
		t.Fatalf("uncork: %v, %d writes", err, len(raw.writes))
	}
}

func TestUncorkReportsFailedWrites(t *testing.T) {
	c := NewCorkConn(failConn{})
	c.Cork()
	if _, err := c.Write([]byte("held")); err != nil {
		t.Fatalf("held write failed early: %v", err)
	}
	if err := c.Uncork(); err == nil {
		t.Fatal("Uncork hid the failure of the writes it held")
	}
}

// Through TLS on a real connection: the batch arrives whole, and CorkOf
// finds the raw conn beneath a tls.Conn.
func TestCorkBeneathTLS(t *testing.T) {
	cert := selfSigned(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		s := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{cert}})
		b, _ := io.ReadAll(s)
		got <- b
	}()
	raw, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(NewCorkConn(raw), &tls.Config{InsecureSkipVerify: true})
	if err := tc.Handshake(); err != nil { // uncorked: the handshake must not be held
		t.Fatal(err)
	}
	cork := CorkOf(tc)
	if cork == nil {
		t.Fatal("CorkOf found no CorkConn beneath TLS")
	}
	want := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	cork.Cork()
	for p := want; len(p) > 0; p = p[4096:] {
		tc.Write(p[:4096])
	}
	if err := cork.Uncork(); err != nil {
		t.Fatal(err)
	}
	tc.Close()
	select {
	case b := <-got:
		if !bytes.Equal(b, want) {
			t.Fatalf("received %d bytes, want the 1 MiB sent", len(b))
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing arrived")
	}
}

func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
