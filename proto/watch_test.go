package proto

import (
	"bytes"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"

	"github.com/hashicorp/yamux"
)

// watchedPipe is a yamux server's conn whose reads are watched.
type watchedPipe struct {
	*FrameWatch
	net.Conn
}

func (w watchedPipe) Read(p []byte) (int, error) { return w.FrameWatch.Read(p) }

// The watcher must see what yamux itself acts on: one opening frame per
// stream the peer opens (pings are not streams), and exactly the bytes
// that reach each stream, however the reads split the frames.
func TestFrameWatchSeesStreamsAndTheirBytes(t *testing.T) {
	cc, sc := net.Pipe()
	var mu sync.Mutex
	opened := map[uint32]int{}
	data := map[uint32]uint32{}
	watch := WatchFrames(sc, func(h FrameHeader) {
		mu.Lock()
		defer mu.Unlock()
		if h.Opens() {
			opened[h.StreamID]++
		}
		if h.IsData() {
			data[h.StreamID] += h.Length
		}
	})
	server, err := yamux.Server(watchedPipe{watch, sc}, YamuxConfig(slog.New(slog.DiscardHandler), 0, RelayStreamWindow))
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	client, err := yamux.Client(cc, YamuxConfig(slog.New(slog.DiscardHandler), 0, RelayStreamWindow))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	if _, err := client.Ping(); err != nil {
		t.Fatal(err)
	}

	sizes := []int{0, 1, 11, 12, 5000, 300 << 10, 5 << 20} // the last is past one window
	got := map[uint32]int{}
	var wg sync.WaitGroup
	for _, n := range sizes {
		s, err := client.OpenStream()
		if err != nil {
			t.Fatal(err)
		}
		wg.Go(func() {
			defer s.Close()
			s.Write(bytes.Repeat([]byte{'x'}, n))
		})
		in, err := server.AcceptStream()
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(in)
		if err != nil {
			t.Fatal(err)
		}
		in.Close()
		got[in.StreamID()] = len(b)
	}
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	if len(opened) != len(sizes) {
		t.Errorf("watcher saw %d streams opened, want %d: %v", len(opened), len(sizes), opened)
	}
	for id, n := range got {
		if opened[id] != 1 {
			t.Errorf("stream %d: seen opened %d times, want once", id, opened[id])
		}
		if int(data[id]) != n {
			t.Errorf("stream %d: watcher counted %d data bytes, the stream read %d", id, data[id], n)
		}
	}
}

// scanAll is the reference: the whole stream in one piece.
func scanAll(b []byte) []FrameHeader {
	var out []FrameHeader
	w := WatchFrames(nil, func(h FrameHeader) { out = append(out, h) })
	w.scan(b)
	return out
}

func FuzzFrameWatch(f *testing.F) {
	frame := func(typ byte, flags uint16, id, length uint32, body int) []byte {
		b := []byte{0, typ, byte(flags >> 8), byte(flags), byte(id >> 24), byte(id >> 16), byte(id >> 8), byte(id),
			byte(length >> 24), byte(length >> 16), byte(length >> 8), byte(length)}
		return append(b, bytes.Repeat([]byte{0}, body)...)
	}
	var seed []byte
	seed = append(seed, frame(1, 1, 1, 0, 0)...)
	seed = append(seed, frame(0, 0, 1, 20, 20)...)
	seed = append(seed, frame(2, 1, 0, 7, 0)...)
	seed = append(seed, frame(0, 1, 3, 3, 3)...)
	f.Add(seed, []byte{1, 5, 12, 13})
	f.Add(frame(0, 0, 1, 0xffffffff, 40), []byte{3})
	f.Add(append(frame(1, 1, 1, 0, 0), 7, 7, 7), []byte{0})
	f.Fuzz(func(t *testing.T, b, cuts []byte) {
		want := scanAll(b)
		// The same bytes in reads of the sizes cuts gives.
		var got []FrameHeader
		w := WatchFrames(nil, func(h FrameHeader) { got = append(got, h) })
		rest := b
		for i := 0; len(rest) > 0; i++ {
			n := len(rest)
			if len(cuts) > 0 {
				n = min(n, int(cuts[i%len(cuts)])+1)
			}
			w.scan(rest[:n])
			rest = rest[n:]
		}
		if len(got) != len(want) {
			t.Fatalf("split reads saw %d frames, one read %d", len(got), len(want))
		}
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("frame %d: split reads %+v, one read %+v", i, got[i], want[i])
			}
		}
		// Every header reported starts where the one before it says.
		off := 0
		for _, h := range want {
			if b[off] != 0 || b[off+1] != h.Type {
				t.Fatalf("header at %d does not match %+v", off, h)
			}
			off += yamuxHeaderLen
			if h.IsData() {
				off += int(h.Length)
			}
			if off >= len(b) {
				break
			}
		}
	})
}
