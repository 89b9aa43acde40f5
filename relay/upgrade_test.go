package relay

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/ferry-tunnel/ferry/internal/testrig"
	"github.com/ferry-tunnel/ferry/proto"
)

// With the small buffers the relay's upgrade keeps, a batch of frames to
// the agent still leaves in full TLS records, whole: a 12 KiB batch in one
// record (with the server's own 4 KiB buffer it was two, and with a small
// buffer and no cork also two), 1 MiB in about 64.
func TestUpgradedConnSendsFullRecords(t *testing.T) {
	pki, err := testrig.NewPKI(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	batches := [][]byte{
		bytes.Repeat([]byte("0123456789abcdef"), 12<<6), // 12 KiB: one record
		bytes.Repeat([]byte("0123456789abcdef"), 1<<16), // 1 MiB: 64 full records
	}
	sent := make(chan error, len(batches))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			slot := proto.CorkSlotFrom(r.Context())
			ws, err := websocket.Accept(leanHijack{w, slot}, r, nil)
			if err != nil {
				sent <- err
				return
			}
			conn := proto.WebSocketConn(context.Background(), ws, slot.Corker())
			defer conn.Close()
			for _, b := range batches {
				_, err := conn.Write(b)
				sent <- err
				if _, _, err := ws.Read(r.Context()); err != nil { // the client has it
					return
				}
			}
			ws.Read(r.Context()) // until the client goes
		}),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			slot := &proto.CorkSlot{}
			slot.Add(proto.CorkOf(c))
			return proto.WithCorkSlot(ctx, slot)
		},
		ReadHeaderTimeout: 10 * time.Second,
	}
	done := make(chan struct{})
	// Full-size records from the first byte: TLS otherwise starts a
	// connection with small ones (dynamic record sizing, the first 128 KiB).
	stls := pki.ServerTLS()
	stls.DynamicRecordSizingDisabled = true
	go func() {
		defer close(done)
		srv.Serve(tls.NewListener(proto.CorkListener{Listener: ln}, stls))
	}()
	defer func() {
		srv.Close()
		<-done
	}()

	raws := make(chan *testrig.TLSRecords, 1)
	tr := &http.Transport{
		TLSClientConfig: pki.ClientTLS(),
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			rc := &testrig.TLSRecords{Conn: c}
			select { // a second dial, if any, is not counted
			case raws <- rc:
			default:
			}
			return rc, nil
		},
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "wss://"+ln.Addr().String()+"/", &websocket.DialOptions{HTTPClient: &http.Client{Transport: tr}})
	if err != nil {
		t.Fatal(err)
	}
	defer ws.CloseNow()
	raw := <-raws
	ws.SetReadLimit(-1)
	for i, batch := range batches {
		before := raw.Records()
		_, got, err := ws.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := <-sent; err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, batch) {
			t.Fatalf("agent received %d bytes, want the %d-byte batch", len(got), len(batch))
		}
		n := raw.Records() - before
		if want := []int{1, 72}[i]; n > want {
			t.Errorf("a %d-byte batch arrived in %d TLS records; want at most %d", len(batch), n, want)
		}
		if err := ws.Write(ctx, websocket.MessageBinary, []byte("next")); err != nil {
			t.Fatal(err)
		}
	}
}
