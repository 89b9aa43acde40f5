// Package version holds the build's version, set at link time:
// -ldflags "-X github.com/ferry-tunnel/ferry/internal/version.Version=v1.2.3".
package version

import "runtime/debug"

// Version of this build.
var Version = "dev"

// Commit is the VCS revision the build came from, when Go recorded it.
func Commit() string {
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				return s.Value
			}
		}
	}
	return "unknown"
}
