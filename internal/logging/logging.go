// Package logging builds the slog logger both daemons use.
package logging

import (
	"io"
	"log/slog"
	"strings"

	"github.com/ferry-tunnel/ferry/internal/config"
)

// New returns a logger writing to w in the configured format and level.
func New(w io.Writer, c config.Log) *slog.Logger {
	var level slog.Level
	level.UnmarshalText([]byte(strings.ToUpper(c.Level)))
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// Discard is a logger that drops everything, for tests that do not read logs.
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }
