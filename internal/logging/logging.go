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
