// Package logging builds the slog logger both daemons use.
package logging

import (
	"context"
	"io"
	"log"
	"log/slog"
	"strings"

	"github.com/ferry-tunnel/ferry/internal/config"
)

// New returns a logger writing to w in the configured format and level.
func New(w io.Writer, c config.Log) *slog.Logger {
	l, _ := NewLeveled(w, c)
	return l
}

// NewLeveled is New with the level held in a LevelVar, so that a config
// reload can change it.
func NewLeveled(w io.Writer, c config.Log) (*slog.Logger, *slog.LevelVar) {
	lv := new(slog.LevelVar)
	var level slog.Level
	level.UnmarshalText([]byte(strings.ToUpper(c.Level)))
	lv.Set(level)
	opts := &slog.HandlerOptions{Level: lv}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts)), lv
	}
	return slog.New(slog.NewJSONHandler(w, opts)), lv
}

// Discard is a logger that drops everything, for tests that do not read logs.
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }

// ServerErrorLog is the ErrorLog for an http.Server or a ReverseProxy.
// Most of what net/http reports there is about one peer (a failed TLS
// handshake from a port scanner, a client gone mid-body) and goes out at
// debug level; what the operator must see is raised: a listener that
// cannot accept (out of file descriptors) and a handler's panic at error,
// a handler's misuse of its ResponseWriter at warn.
func ServerErrorLog(l *slog.Logger) *log.Logger {
	return log.New(serverErrorWriter{l}, "", 0)
}

type serverErrorWriter struct{ l *slog.Logger }

func (w serverErrorWriter) Write(p []byte) (int, error) {
	msg := strings.TrimSuffix(string(p), "\n")
	level := slog.LevelDebug
	switch {
	case strings.HasPrefix(msg, "http: Accept error"), strings.HasPrefix(msg, "http: panic serving"):
		level = slog.LevelError
	case strings.HasPrefix(msg, "http: superfluous"), strings.HasPrefix(msg, "http: response.Write on hijacked"):
		level = slog.LevelWarn
	}
	w.l.Log(context.Background(), level, msg)
	return len(p), nil
}
