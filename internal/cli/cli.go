// Package cli holds what both mains share: flag parsing for --config,
// signal handling and the exit-code contract (2 for bad config or usage,
// 1 for runtime failure).
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/ferry-tunnel/ferry/internal/config"
)

// ErrUsage marks a command-line mistake (exit 2).
var ErrUsage = errors.New("usage")

// ErrChecksFailed ends a command whose report already said what failed
// (exit 1, no further message).
var ErrChecksFailed = errors.New("checks failed")

// Usagef returns a usage error with a message.
func Usagef(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrUsage}, args...)...)
}

// ConfigFlag parses "--config FILE" (and nothing else) from args.
func ConfigFlag(name string, args []string, stderr io.Writer) (string, error) {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	path := fs.String("config", "", "configuration file (YAML)")
	if err := fs.Parse(args); err != nil {
		return "", Usagef("%v", err)
	}
	if fs.NArg() > 0 {
		return "", Usagef("unexpected argument %q", fs.Arg(0))
	}
	if *path == "" {
		return "", Usagef("--config FILE is required")
	}
	return *path, nil
}

// SignalContext is cancelled on SIGINT or SIGTERM.
func SignalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// NotifyHangup starts catching SIGHUP, whose default action would end
// the process: call it before anything slow, then hand the channel to
// OnHangup.
func NotifyHangup() chan os.Signal {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	return hup
}

// OnHangup calls reload on every SIGHUP until ctx ends.
func OnHangup(ctx context.Context, hup chan os.Signal, reload func()) {
	defer signal.Stop(hup)
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			reload()
		}
	}
}

// Exit prints err as one line and exits with the contract's code.
func Exit(prog string, err error) {
	if err == nil {
		os.Exit(0)
	}
	if errors.Is(err, ErrChecksFailed) {
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "%s: %v\n", prog, err)
	if errors.Is(err, ErrUsage) || config.IsConfigError(err) {
		os.Exit(2)
	}
	os.Exit(1)
}
