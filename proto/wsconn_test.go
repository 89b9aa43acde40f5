package proto

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// wsPair is a real WebSocket over loopback: the server's end as a wsConn
// living for ctx, the client's end as it is.
func wsPair(t *testing.T, ctx context.Context) (*wsConn, *websocket.Conn) {
	t.Helper()
	accepted := make(chan *websocket.Conn, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ws, err := websocket.Accept(w, r, nil)
		if err != nil {
			return
		}
		accepted <- ws
	}))
	t.Cleanup(srv.Close)
	client, _, err := websocket.Dial(context.Background(), "ws://"+srv.Listener.Addr().String(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.CloseNow() })
	c := newWSConn(ctx, <-accepted)
	t.Cleanup(func() { c.Close() })
	return c, client
}

// Messages read as one byte stream, in order, whatever their sizes and
// the reads'; each write is one message.
func TestWSConnCarriesBytesAcrossMessages(t *testing.T) {
	c, client := wsPair(t, context.Background())
	var want bytes.Buffer
	go func() {
		for i, n := range []int{1, 0, 5000, 70 << 10, 3} { // larger than the default read limit
			m := bytes.Repeat([]byte{byte('a' + i)}, n)
			client.Write(context.Background(), websocket.MessageBinary, m)
		}
		client.Close(websocket.StatusNormalClosure, "")
	}()
	for i, n := range []int{1, 0, 5000, 70 << 10, 3} {
		want.Write(bytes.Repeat([]byte{byte('a' + i)}, n))
	}
	got, err := io.ReadAll(io.LimitReader(c, int64(want.Len())))
	if err != nil || !bytes.Equal(got, want.Bytes()) {
		t.Fatalf("read %d bytes (%v), want the %d written", len(got), err, want.Len())
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("after the peer's normal close: %v, want EOF", err)
	}

	if _, err := c.Write([]byte("one message")); err == nil {
		t.Fatal("write after the close succeeded")
	}
}

func TestWSConnRefusesTextMessages(t *testing.T) {
	c, client := wsPair(t, context.Background())
	go client.Write(context.Background(), websocket.MessageText, []byte("hello"))
	if _, err := c.Read(make([]byte, 10)); err == nil {
		t.Fatal("a text message was read as data")
	}
}

// The read deadline cuts a silent peer: the blocked read returns
// ErrReadIdle and the connection is closed.
func TestWSConnReadDeadlineClosesTheConn(t *testing.T) {
	c, client := wsPair(t, context.Background())
	c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := c.Read(make([]byte, 10)); !errors.Is(err, ErrReadIdle) {
		t.Fatalf("read past the deadline: %v, want ErrReadIdle", err)
	}
	client.SetReadLimit(-1)
	if _, _, err := client.Read(context.Background()); err == nil {
		t.Fatal("the peer's connection stayed open")
	}
	// A deadline moved on in time, or cleared, does not fire.
	c2, client2 := wsPair(t, context.Background())
	c2.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	c2.SetReadDeadline(time.Time{})
	go func() {
		time.Sleep(100 * time.Millisecond)
		client2.Write(context.Background(), websocket.MessageBinary, []byte("late"))
	}()
	if n, err := c2.Read(make([]byte, 10)); err != nil || n != 4 {
		t.Fatalf("read with the deadline cleared: %d, %v", n, err)
	}
}

// The connection ends with its context: a blocked read returns.
func TestWSConnEndsWithItsContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	c, _ := wsPair(t, ctx)
	done := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		done <- err
	}()
	cancel()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("read returned no error after the context ended")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("read still blocked after the context ended")
	}
}
