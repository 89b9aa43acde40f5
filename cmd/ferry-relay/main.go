// Command ferry-relay accepts ferry agents over WSS and exposes their
// tunnels to cloud scanners. See the README.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/ferry-tunnel/ferry/internal/cli"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/gctune"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/token"
	"github.com/ferry-tunnel/ferry/internal/version"
	"github.com/ferry-tunnel/ferry/relay"
)

const usage = `usage:
  ferry-relay --config FILE         run the relay
  ferry-relay check --config FILE   validate a config (exit 2 if it is bad) and say what it holds
  ferry-relay status [--addr 127.0.0.1:9090] [--json]
                                    summarise the running relay (its admin_listen)
  ferry-relay token                 print a new token and its sha256 form for the config
  ferry-relay version               print the version`

func main() { cli.Exit("ferry-relay", run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "token":
			t, err := token.Generate()
			if err != nil {
				return err
			}
			fmt.Fprintln(stdout, t)
			fmt.Fprintln(stdout, token.Of(t).String())
			return nil
		case "check":
			return check(args[1:], stdout, stderr)
		case "status":
			return status(args[1:], stdout, stderr)
		case "version":
			fmt.Fprintf(stdout, "ferry-relay %s (%s)\n", version.Version, version.Commit())
			return nil
		case "-h", "--help", "help":
			fmt.Fprintln(stdout, usage)
			return nil
		}
	}
	hup := cli.NotifyHangup()
	path, err := cli.ConfigFlag("ferry-relay", args, stderr)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, usage)
	}
	cfg, err := config.LoadRelay(path)
	if err != nil {
		return err
	}
	ctx, stop := cli.SignalContext()
	defer stop()
	// The GC's target follows the live heap, unless GOGC is set.
	gc := gctune.Start(gctune.ForRelay())
	defer gc.Stop()
	log, level := logging.NewLeveled(stderr, cfg.Log)
	r, err := relay.New(cfg, log)
	if err != nil {
		return err
	}
	r.SetLevelVar(level)
	if err := r.Listen(); err != nil {
		return err
	}
	// SIGHUP reloads; the goroutine ends with ctx, as Serve does.
	go cli.OnHangup(ctx, hup, func() { r.Reload() })
	return r.Serve(ctx)
}
