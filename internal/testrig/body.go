package testrig

import (
	"io"
	"sync/atomic"
)

// ReadCounter is a request body that counts the reads made of it: a test
// can tell whether a client was ever asked for the body.
type ReadCounter struct {
	R     io.Reader
	reads atomic.Int64
}

func (c *ReadCounter) Read(p []byte) (int, error) {
	c.reads.Add(1)
	return c.R.Read(p)
}

// Reads is how many reads were made.
func (c *ReadCounter) Reads() int64 { return c.reads.Load() }
