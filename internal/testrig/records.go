package testrig

import (
	"encoding/binary"
	"net"
	"sync"
)

// TLSRecords is a raw connection (beneath TLS) that counts the TLS
// application data records read through it, by following the 5-byte
// record headers: how many records a peer cut its data into.
type TLSRecords struct {
	net.Conn

	mu      sync.Mutex
	hdr     []byte // a record header being assembled
	skip    int    // bytes of the current record's body still to pass
	records int
}

func (c *TLSRecords) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	defer c.mu.Unlock()
	for b := p[:n]; len(b) > 0; {
		if c.skip > 0 {
			k := min(c.skip, len(b))
			c.skip, b = c.skip-k, b[k:]
			continue
		}
		k := min(5-len(c.hdr), len(b))
		c.hdr, b = append(c.hdr, b[:k]...), b[k:]
		if len(c.hdr) == 5 {
			if c.hdr[0] == 23 { // application_data
				c.records++
			}
			c.skip, c.hdr = int(binary.BigEndian.Uint16(c.hdr[3:5])), c.hdr[:0]
		}
	}
	return n, err
}

// Records is how many application data records have been read.
func (c *TLSRecords) Records() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.records
}
