// Package spool is the agent's durable webhook queue: one file per
// delivery in a directory, written and fsynced before Bitbucket is told
// the delivery was accepted, removed only once it reached its target.
//
// A file is named "<seq>-<id>.delivery": seq (16 hex digits) gives the
// acceptance order across restarts, id is the delivery's stable id. Files
// that cannot be decoded are moved to quarantine/ and reported, never
// deleted; the rest of the spool is unaffected.
package spool

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/ferry-tunnel/ferry/internal/readfile"
)

// ErrFull is returned by Put when the spool's limits are reached.
var ErrFull = errors.New("webhook spool is full")

const (
	suffix        = ".delivery"
	tmpSuffix     = ".tmp"
	quarantineDir = "quarantine"
)

// Limits bound what the spool holds.
type Limits struct {
	MaxBytes int64 // total size of spooled files
	MaxCount int   // spooled deliveries
}

// Entry is a spooled delivery as the queue knows it: enough to order and
// route it without reading the file.
type Entry struct {
	Seq      uint64
	ID       string
	Repo     string // ordering key ("" when the payload names none)
	Received time.Time
	Size     int64
	name     string
}

// Quarantined describes a file moved aside because it could not be read.
type Quarantined struct {
	File   string    `json:"file"`
	Reason string    `json:"reason"`
	At     time.Time `json:"at"`
}

// Spool is a directory of deliveries. Safe for concurrent use.
type Spool struct {
	dir    string
	limits Limits
	log    *slog.Logger

	mu          sync.Mutex
	seq         uint64
	entries     map[string]*Entry // by id
	bytes       int64
	quarantined []Quarantined // this process's quarantines, newest last (bounded)
	qCount      int           // files in quarantine/ now
}

// Open opens (creating if needed) the spool in dir, removes half-written
// files from a crash (never acknowledged to the sender), quarantines files
// that do not decode, and returns the spool with the rest, in order.
func Open(dir string, limits Limits, log *slog.Logger) (*Spool, []Entry, error) {
	if err := os.MkdirAll(filepath.Join(dir, quarantineDir), 0o700); err != nil {
		return nil, nil, fmt.Errorf("open webhook spool: %w", err)
	}
	s := &Spool{dir: dir, limits: limits, log: log, entries: map[string]*Entry{}}
	des, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("open webhook spool: %w", err)
	}
	var out []Entry
	for _, de := range des {
		name := de.Name()
		switch {
		case de.IsDir():
			continue
		case strings.HasSuffix(name, tmpSuffix):
			// Written before a crash and never fsynced into place:
			// the sender was not answered 2xx and will retry.
			os.Remove(filepath.Join(dir, name))
			log.Info("removed a partly written webhook delivery left by a crash (its sender was not answered)", "file", name)
			continue
		case !strings.HasSuffix(name, suffix):
			continue
		}
		e, err := s.load(name)
		if err != nil {
			s.quarantine(name, err)
			continue
		}
		s.entries[e.ID] = e
		s.bytes += e.Size
		s.seq = max(s.seq, e.Seq)
		out = append(out, *e)
	}
	if q, err := os.ReadDir(filepath.Join(dir, quarantineDir)); err == nil {
		s.qCount = len(q)
	}
	slices.SortFunc(out, func(a, b Entry) int { return cmpSeq(a.Seq, b.Seq) })
	return s, out, nil
}

func cmpSeq(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// load reads and checks one spooled file.
func (s *Spool) load(name string) (*Entry, error) {
	seq, id, ok := parseName(name)
	if !ok {
		return nil, errors.New("file name is not <seq>-<id>.delivery")
	}
	data, err := readfile.Regular(filepath.Join(s.dir, name), maxFile)
	if err != nil {
		return nil, err
	}
	d, err := Decode(data)
	if err != nil {
		return nil, err
	}
	if d.ID != id {
		return nil, fmt.Errorf("file name says delivery %s, content says %s", id, d.ID)
	}
	return &Entry{Seq: seq, ID: id, Repo: d.Repo, Received: d.Received, Size: int64(len(data)), name: name}, nil
}

func parseName(name string) (seq uint64, id string, ok bool) {
	base, found := strings.CutSuffix(name, suffix)
	if !found {
		return 0, "", false
	}
	hexSeq, id, found := strings.Cut(base, "-")
	if !found || len(hexSeq) != 16 || !validID(id) {
		return 0, "", false
	}
	seq, err := strconv.ParseUint(hexSeq, 16, 64)
	return seq, id, err == nil
}

// NewID returns a fresh delivery id.
func NewID() string {
	var b [12]byte
	rand.Read(b[:])
	return "wh-" + hex.EncodeToString(b[:])
}

func validID(id string) bool {
	if len(id) < 1 || len(id) > 64 {
		return false
	}
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// Put writes d durably (file fsynced, renamed into place, directory
// fsynced) and returns its entry. ErrFull when the limits are reached.
func (s *Spool) Put(d Delivery) (Entry, error) {
	if !validID(d.ID) {
		return Entry{}, fmt.Errorf("spool delivery: invalid id %q", d.ID)
	}
	data, err := d.Encode()
	if err != nil {
		return Entry{}, err
	}
	s.mu.Lock()
	if len(s.entries) >= s.limits.MaxCount || s.bytes+int64(len(data)) > s.limits.MaxBytes {
		s.mu.Unlock()
		return Entry{}, ErrFull
	}
	// seq: time-based so it keeps growing across restarts, and strictly
	// above every seq seen.
	s.seq = max(s.seq+1, uint64(time.Now().UnixNano()))
	e := &Entry{Seq: s.seq, ID: d.ID, Repo: d.Repo, Received: d.Received, Size: int64(len(data))}
	e.name = fmt.Sprintf("%016x-%s%s", e.Seq, e.ID, suffix)
	// Reserve the room now so concurrent Puts cannot overshoot.
	s.entries[e.ID] = e
	s.bytes += e.Size
	s.mu.Unlock()

	if err := s.write(e.name, data); err != nil {
		s.mu.Lock()
		delete(s.entries, e.ID)
		s.bytes -= e.Size
		s.mu.Unlock()
		return Entry{}, fmt.Errorf("spool delivery %s: %w", d.ID, err)
	}
	return *e, nil
}

func (s *Spool) write(name string, data []byte) error {
	tmp := filepath.Join(s.dir, name+tmpSuffix)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	final := filepath.Join(s.dir, name)
	if err := os.Rename(tmp, final); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := syncDir(s.dir); err != nil {
		// The sender is told to retry, so the file must not stay for the
		// next start to deliver as well (nor outside this spool's count).
		os.Remove(final)
		return err
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Read returns the delivery for a spooled entry. A file that no longer
// decodes is quarantined and reported as an error.
func (s *Spool) Read(e Entry) (Delivery, error) {
	data, err := readfile.Regular(filepath.Join(s.dir, e.name), maxFile)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			s.forget(e.ID)
		}
		return Delivery{}, fmt.Errorf("read spooled delivery %s: %w", e.ID, err)
	}
	d, err := Decode(data)
	if err == nil && d.ID != e.ID {
		err = fmt.Errorf("file name says delivery %s, content says %s", e.ID, d.ID)
	}
	if err != nil {
		s.forget(e.ID)
		s.quarantine(e.name, err)
		return Delivery{}, fmt.Errorf("read spooled delivery %s: %w", e.ID, err)
	}
	return d, nil
}

// Remove deletes a delivered entry.
func (s *Spool) Remove(e Entry) error {
	err := os.Remove(filepath.Join(s.dir, e.name))
	if errors.Is(err, fs.ErrNotExist) {
		err = nil
	}
	s.forget(e.ID)
	return err
}

func (s *Spool) forget(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if e, ok := s.entries[id]; ok {
		s.bytes -= e.Size
		delete(s.entries, id)
	}
}

// quarantine moves a bad file aside, keeping it for a human to look at.
func (s *Spool) quarantine(name string, reason error) {
	from := filepath.Join(s.dir, name)
	to := filepath.Join(s.dir, quarantineDir, name)
	if err := os.Rename(from, to); err != nil {
		s.log.Error("cannot quarantine a bad webhook spool file; leaving it", "file", from, "reason", reason, "err", err)
		return
	}
	s.log.Error("webhook spool file is corrupt; moved to quarantine, the rest of the spool is delivered", "file", to, "reason", reason)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.qCount++
	s.quarantined = append(s.quarantined, Quarantined{File: to, Reason: reason.Error(), At: time.Now()})
	if len(s.quarantined) > 20 {
		s.quarantined = s.quarantined[1:]
	}
}

// Stats is what the spool holds now.
type Stats struct {
	Dir              string        `json:"dir"`
	Spooled          int           `json:"spooled"`
	Bytes            int64         `json:"bytes"`
	Oldest           time.Time     `json:"oldest,omitempty"`
	Quarantined      int           `json:"quarantined"`
	RecentQuarantine []Quarantined `json:"recent_quarantine,omitempty"`
	MaxCount         int           `json:"max_count"`
	MaxBytes         int64         `json:"max_bytes"`
}

// SetLimits changes the spool's bounds (a config reload). Lowered under
// what it holds, it keeps every delivery and refuses new ones until it
// is back under them.
func (s *Spool) SetLimits(l Limits) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.limits = l
}

// Stats reports the spool's contents.
func (s *Spool) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{Dir: s.dir, Spooled: len(s.entries), Bytes: s.bytes, Quarantined: s.qCount,
		RecentQuarantine: slices.Clone(s.quarantined), MaxCount: s.limits.MaxCount, MaxBytes: s.limits.MaxBytes}
	for _, e := range s.entries {
		if st.Oldest.IsZero() || e.Received.Before(st.Oldest) {
			st.Oldest = e.Received
		}
	}
	return st
}

// Inspect reports what dir holds without changing anything (unlike Open,
// which cleans up): safe while an agent is using the spool. Oldest is the
// oldest file's modification time.
func Inspect(dir string) (Stats, error) {
	st := Stats{Dir: dir}
	des, err := os.ReadDir(dir)
	if err != nil {
		return st, err
	}
	for _, de := range des {
		if de.IsDir() || !strings.HasSuffix(de.Name(), suffix) {
			continue
		}
		info, err := de.Info()
		if err != nil {
			continue // delivered meanwhile
		}
		st.Spooled++
		st.Bytes += info.Size()
		if st.Oldest.IsZero() || info.ModTime().Before(st.Oldest) {
			st.Oldest = info.ModTime()
		}
	}
	if q, err := os.ReadDir(filepath.Join(dir, quarantineDir)); err == nil {
		st.Quarantined = len(q)
	}
	return st, nil
}
