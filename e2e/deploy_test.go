package e2e

import (
	"bytes"
	"errors"
	"io"
	"os"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"

	"github.com/ferry-tunnel/ferry/internal/config"
)

// The Kubernetes manifests are what a cloud team applies: each document
// must be a Kubernetes object, the relay config in them must be one the
// relay accepts, and the probes must hit the relay's real endpoints.
func TestKubernetesManifests(t *testing.T) {
	f, err := os.Open("../deploy/kubernetes/relay.yaml")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	kinds := map[string]int{}
	for {
		var doc map[string]any
		if err := dec.Decode(&doc); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatal(err)
		}
		kind, _ := doc["kind"].(string)
		if kind == "" || doc["apiVersion"] == nil || doc["metadata"] == nil {
			t.Fatalf("not a Kubernetes object: %v", doc)
		}
		kinds[kind]++
		if kind == "Secret" {
			sd, _ := doc["stringData"].(map[string]any)
			if rc, ok := sd["relay.yaml"].(string); ok {
				w := newWorld(t)
				rc = strings.NewReplacer("/etc/ferry/tls/tls.crt", w.pki.CertFile, "/etc/ferry/tls/tls.key", w.pki.KeyFile).Replace(rc)
				if _, err := config.ParseRelay("relay.yaml (Secret)", []byte(rc)); err != nil {
					t.Fatalf("the manifest's relay config is refused: %v", err)
				}
			}
		}
		if kind == "Deployment" {
			b, _ := yaml.Marshal(doc)
			for _, want := range []string{"path: /healthz", "path: /readyz", "readOnlyRootFilesystem: true", "runAsNonRoot: true"} {
				if !bytes.Contains(b, []byte(want)) {
					t.Errorf("Deployment lacks %q", want)
				}
			}
		}
	}
	for _, k := range []string{"Deployment", "Service", "Secret", "PodDisruptionBudget"} {
		if kinds[k] == 0 {
			t.Errorf("no %s in the manifests", k)
		}
	}
}
