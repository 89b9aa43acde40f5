package cli

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"time"
)

// ReadStatus is what a status command does before printing: it parses
// --addr (default defAddr) and --json, and reads the daemon's document at
// path into v. With --json it prints the document as is and reports done.
// who and setting make an error say what to check.
func ReadStatus(args []string, stdout, stderr io.Writer, who, setting, defAddr, path string, v any) (done bool, err error) {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("addr", defAddr, "the daemon's "+setting+" address")
	asJSON := fs.Bool("json", false, "print the raw JSON")
	if err := fs.Parse(args); err != nil {
		return false, Usagef("%v", err)
	}
	body, err := fetchStatus(*addr, path, who, setting)
	if err != nil {
		return false, err
	}
	if *asJSON {
		_, err := stdout.Write(body)
		return true, err
	}
	if err := json.Unmarshal(body, v); err != nil {
		return false, fmt.Errorf("%s status: %w", who, err)
	}
	return false, nil
}

// fetchStatus reads a running daemon's JSON status document from its
// admin listener.
func fetchStatus(addr, path, who, setting string) ([]byte, error) {
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
