package config

import (
	"testing"

	"github.com/ferry-tunnel/ferry/internal/testrig"
)

func writeTestCert(t *testing.T, dir string) (cert, key string) {
	t.Helper()
	p, err := testrig.NewPKI(dir)
	if err != nil {
		t.Fatal(err)
	}
	return p.CertFile, p.KeyFile
}
