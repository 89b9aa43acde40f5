package cli

import (
	"flag"
	"fmt"
	"io"
	"net/http"
	"time"
)

// StatusFlags parses a status command's flags: --addr (the admin
// listener, defaulting to def) and --json.
func StatusFlags(args []string, stderr io.Writer, def, setting string) (addr string, asJSON bool, err error) {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	a := fs.String("addr", def, "the daemon's "+setting+" address")
	j := fs.Bool("json", false, "print the raw JSON")
	if err := fs.Parse(args); err != nil {
		return "", false, Usagef("%v", err)
	}
	return *a, *j, nil
}

// FetchStatus reads a running daemon's JSON status document from its
// admin listener. who and setting make the error say what to check.
func FetchStatus(addr, path, who, setting string) ([]byte, error) {
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + addr + path)
	if err != nil {
		return nil, fmt.Errorf("read %s status from %s: %w (is %s running, and is %s %s?)", who, addr, err, who, setting, addr)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("read %s status: %w", who, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s status from %s: %s", who, addr, resp.Status)
	}
	return body, nil
}
