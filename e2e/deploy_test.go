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
	for _, name := range []string{"relay.yaml", "relay-scaled.yaml"} {
		t.Run(name, func(t *testing.T) { checkManifests(t, "../deploy/kubernetes/"+name) })
	}
}

func checkManifests(t *testing.T, path string) {
	t.Setenv("POD_IP", "10.1.2.3")
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dec := yaml.NewDecoder(f)
	kinds := map[string]int{}
	var relayCfgs []*config.Relay
	var deployments []map[string]any
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
				peer := w.write("peer-secret", "deploy-test-peer-secret")
				rc = strings.NewReplacer("/etc/ferry/tls/tls.crt", w.pki.CertFile, "/etc/ferry/tls/tls.key", w.pki.KeyFile, "/etc/ferry/peer/secret", peer).Replace(rc)
				cfg, err := config.ParseRelay("relay.yaml (Secret)", []byte(rc))
				if err != nil {
					t.Fatalf("the manifest's relay config is refused: %v", err)
				}
				relayCfgs = append(relayCfgs, cfg)
			}
		}
		if kind == "Deployment" && doc["metadata"].(map[string]any)["name"] == "ferry-relay" {
			deployments = append(deployments, doc)
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
	if len(relayCfgs) != 1 || len(deployments) != 1 {
		t.Fatalf("%d relay configs and %d relay Deployments in the manifests, want 1 each", len(relayCfgs), len(deployments))
	}
	// The scaled form: several replicas need the Redis registry, each
	// advertising its own pod IP, and the relay Deployment sets POD_IP.
	replicas := deployments[0]["spec"].(map[string]any)["replicas"].(int)
	reg := relayCfgs[0].Registry
	switch {
	case replicas > 1 && reg.Backend != "redis":
		t.Errorf("%d replicas with registry %s: scanners would land on replicas without the agent", replicas, reg.Backend)
	case reg.Backend == "redis":
		b, _ := yaml.Marshal(deployments[0])
		if reg.AdvertiseURL != "http://10.1.2.3:7443" || !bytes.Contains(b, []byte("fieldPath: status.podIP")) || kinds["Deployment"] < 2 {
			t.Errorf("scaled manifests: advertise %s, POD_IP from the Downward API %v, %d Deployments (relay and Redis)",
				reg.AdvertiseURL, bytes.Contains(b, []byte("status.podIP")), kinds["Deployment"])
		}
	}
}
