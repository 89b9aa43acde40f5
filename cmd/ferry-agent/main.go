// Command ferry-agent runs inside the private network, keeps outbound WSS
// connections to a ferry relay and serves the requests its policy allows.
// See the README.
package main

import (
	"fmt"
	"io"
	"os"

	"github.com/ferry-tunnel/ferry/agent"
	"github.com/ferry-tunnel/ferry/internal/cli"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/gctune"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/version"
)

const usage = `usage:
  ferry-agent --config FILE                 run the agent
  ferry-agent doctor --config FILE          check config, network, TLS, token, upstreams
  ferry-agent status [--addr HOST:PORT]     summarise the running agent
  ferry-agent version                       print the version`

func main() { cli.Exit("ferry-agent", run(os.Args[1:], os.Stdout, os.Stderr)) }

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "status":
			return status(args[1:], stdout, stderr)
		case "doctor":
			path, err := cli.ConfigFlag("ferry-agent doctor", args[1:], stderr)
			if err != nil {
				return err
			}
			ctx, stop := cli.SignalContext()
			defer stop()
			if !agent.Doctor(ctx, path, stdout) {
				return cli.ErrChecksFailed
			}
			return nil
		case "version":
			fmt.Fprintf(stdout, "ferry-agent %s (%s)\n", version.Version, version.Commit())
			return nil
		case "-h", "--help", "help":
			fmt.Fprintln(stdout, usage)
			return nil
		}
	}
	hup := cli.NotifyHangup()
	path, err := cli.ConfigFlag("ferry-agent", args, stderr)
	if err != nil {
		return fmt.Errorf("%w\n%s", err, usage)
	}
	cfg, err := config.LoadAgent(path)
	if err != nil {
		return err
	}
	ctx, stop := cli.SignalContext()
	defer stop()
	// The GC's target follows the live heap, unless GOGC is set.
	gc := gctune.Start(gctune.ForAgent())
	defer gc.Stop()
	log, level := logging.NewLeveled(stderr, cfg.Log)
	a, err := agent.New(cfg, log)
	if err != nil {
		return err
	}
	a.SetLevelVar(level)
	if err := a.Listen(); err != nil {
		return err
	}
	// SIGHUP reloads; the goroutine ends with ctx, as Serve does.
	go cli.OnHangup(ctx, hup, func() { a.Reload() })
	return a.Serve(ctx)
}
