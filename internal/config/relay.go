package config

import (
	"crypto/tls"
	"fmt"
	"net"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/ferry-tunnel/ferry/internal/secret"
	"github.com/ferry-tunnel/ferry/internal/token"
)

// Relay is ferry-relay's configuration.
type Relay struct {
	AgentListen       string        `yaml:"agent_listen"`
	TLS               *TLSFiles     `yaml:"tls"`
	InsecurePlaintext bool          `yaml:"insecure_plaintext"`
	ScannerListen     string        `yaml:"scanner_listen"`
	ScannerTLS        *TLSFiles     `yaml:"scanner_tls"`
	AdminListen       string        `yaml:"admin_listen"`
	AdminPprof        bool          `yaml:"admin_pprof"` // Go's profiler at /debug/pprof/ on admin_listen
	Tunnels           []Tunnel      `yaml:"tunnels"`
	Scanners          []Scanner     `yaml:"scanners"`
	Registry          Registry      `yaml:"registry"`
	Timeouts          RelayTimeouts `yaml:"timeouts"`
	Limits            Limits        `yaml:"limits"`
	Log               Log           `yaml:"log"`

	// File is where this config was read from, for messages.
	File string `yaml:"-"`
}

// RelayTimeouts bound every wait on a peer that may go silent.
type RelayTimeouts struct {
	AgentHandshake time.Duration `yaml:"agent_handshake"` // agent's hello after the upgrade
	AgentResponse  time.Duration `yaml:"agent_response"`  // the agent's response headers
	Keepalive      time.Duration `yaml:"keepalive"`       // pings to agents that do not announce pings of their own
	Idle           time.Duration `yaml:"idle"`            // a scanner body that moves no byte this long is cut
	HeaderRead     time.Duration `yaml:"header_read"`     // request headers on every listener (slowloris)
	ShutdownGrace  time.Duration `yaml:"shutdown_grace"`  // scanner requests in flight after SIGTERM
}

// Limits bound what one tunnel may take.
type Limits struct {
	// MaxStreamsPerTunnel: requests in flight on one tunnel; past it
	// scanners get 503 tunnel_busy.
	MaxStreamsPerTunnel int `yaml:"max_streams_per_tunnel"`
	// MaxAgentConnsPerTunnel: agent connections one tunnel may hold on
	// this relay; past it the upgrade is refused (a stray agent in a
	// restart loop, or a leaked token, cannot exhaust the relay).
	MaxAgentConnsPerTunnel int `yaml:"max_agent_connections_per_tunnel"`
}

// TLSFiles names a certificate and key in PEM files.
type TLSFiles struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
}

// Tunnel is one customer's tunnel and the agent tokens that may serve it.
type Tunnel struct {
	ID            string   `yaml:"id"`
	AgentTokens   []string `yaml:"agent_tokens"`
	WebhookTarget string   `yaml:"webhook_target"`
	// WebhookTokenFile holds a token the relay sends to webhook_target
	// as "Authorization: Bearer", so the target can tell deliveries from
	// the relay from anyone else's POSTs. Re-read when it changes.
	WebhookTokenFile string `yaml:"webhook_token_file"`

	AgentHashes  []token.Hash  `yaml:"-"`
	WebhookToken secret.Source `yaml:"-"` // nil: no webhook_token_file
}

// Scanner is a cloud client allowed to use some tunnels.
type Scanner struct {
	Name    string   `yaml:"name"`
	Token   string   `yaml:"token"`
	Tunnels []string `yaml:"tunnels"`
	// MaxStreams bounds this scanner's requests in flight on this relay,
	// over all its tunnels (0: only the tunnels' own limit), so that one
	// scanner cannot take a tunnel's every slot from the others.
	MaxStreams int `yaml:"max_streams"`

	Hash token.Hash `yaml:"-"`
}

// Registry says where the relay records which tunnels it holds.
type Registry struct {
	Backend        string `yaml:"backend"`
	RedisURL       string `yaml:"redis_url"`
	AdvertiseURL   string `yaml:"advertise_url"`
	InternalListen string `yaml:"internal_listen"`
	PeerSecretFile string `yaml:"peer_secret_file"`

	PeerSecret *secret.File `yaml:"-"` // nil: a shared secret is kept in Redis
}

// validateRedis checks the scale-out settings. advertise_url may name
// environment variables (${POD_IP}), expanded here, since each replica
// advertises its own address from one shared config.
func (g *Registry) validateRedis(v *validator) {
	if g.RedisURL == "" {
		v.failf("registry.redis_url", "required with backend: redis, e.g. redis://redis.ferry.svc:6379/0")
	} else if _, err := redis.ParseURL(g.RedisURL); err != nil {
		v.failf("registry.redis_url", "%v", err)
	}
	if g.AdvertiseURL == "" {
		v.failf("registry.advertise_url", "required with backend: redis: where other replicas reach this one, e.g. http://${POD_IP}:7443")
		return
	}
	var missing []string
	expanded := os.Expand(g.AdvertiseURL, func(name string) string {
		val := os.Getenv(name)
		if val == "" {
			missing = append(missing, name)
		}
		return val
	})
	if len(missing) > 0 {
		v.failf("registry.advertise_url", "uses $%s, which is not set", strings.Join(missing, ", $"))
		return
	}
	g.AdvertiseURL = strings.TrimSuffix(expanded, "/")
	u := checkURL(v, "registry.advertise_url", g.AdvertiseURL, "http")
	if u == nil {
		return
	}
	if u.Port() == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		v.failf("registry.advertise_url", "%q must be http://HOST:PORT, nothing after the port", g.AdvertiseURL)
		return
	}
	if h := u.Hostname(); h == "0.0.0.0" || h == "::" {
		v.failf("registry.advertise_url", "%q is not an address other replicas can reach", g.AdvertiseURL)
	}
	if g.InternalListen == "" {
		g.InternalListen = u.Host
	}
	checkListen(v, "registry.internal_listen", g.InternalListen)
	if g.PeerSecretFile != "" {
		var err error
		if g.PeerSecretFile, err = ExpandCredentialsDir(g.PeerSecretFile); err != nil {
			v.failf("registry.peer_secret_file", "%v", err)
			return
		}
		// The peer secret lets its holder act as any scanner on the
		// internal listener, so it must not be guessable. Two lines
		// during a rotation: the first is sent, either is accepted.
		src, err := secret.NewFileWith(g.PeerSecretFile, secret.FileOptions{MaxLines: 2, MinLen: 16})
		if err != nil {
			v.failf("registry.peer_secret_file", "%v", err)
			return
		}
		g.PeerSecret = src
	}
}

var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,62}$`)

// LoadRelay reads and validates a relay config file.
func LoadRelay(path string) (*Relay, error) { return load(path, ParseRelay) }

// ParseRelay validates relay config bytes; file is used in messages.
func ParseRelay(file string, data []byte) (*Relay, error) {
	return parse(file, data, &Relay{File: file}, (*Relay).validate)
}

func (c *Relay) validate(v *validator) {
	if c.AgentListen == "" {
		c.AgentListen = ":443"
	}
	if c.ScannerListen == "" {
		c.ScannerListen = "127.0.0.1:8080"
	}
	if c.AdminListen == "" {
		c.AdminListen = "127.0.0.1:9090"
	}
	checkListen(v, "agent_listen", c.AgentListen)
	checkListen(v, "scanner_listen", c.ScannerListen)
	checkListen(v, "admin_listen", c.AdminListen)
	switch {
	case c.TLS == nil && !c.InsecurePlaintext:
		v.failf("tls", "required for agent_listen (agents connect over wss://); set insecure_plaintext: true only behind a TLS-terminating load balancer or in tests")
	case c.TLS != nil && c.InsecurePlaintext:
		v.failf("insecure_plaintext", "conflicts with tls: choose one")
	case c.TLS != nil:
		checkTLSFiles(v, "tls", c.TLS)
	}
	if c.ScannerTLS != nil {
		checkTLSFiles(v, "scanner_tls", c.ScannerTLS)
	}
	if len(c.Tunnels) == 0 {
		v.failf("tunnels", "at least one tunnel is required")
	}
	tunnels := map[string]bool{}
	agentHash := map[token.Hash]string{}
	for i := range c.Tunnels {
		t := &c.Tunnels[i]
		f := fmt.Sprintf("tunnels[%d]", i)
		if !idRE.MatchString(t.ID) {
			v.failf(f+".id", "%q must be 1-63 lowercase letters, digits, '.', '_' or '-'", t.ID)
		}
		if tunnels[t.ID] {
			v.failf(f+".id", "duplicate tunnel id %q", t.ID)
		}
		tunnels[t.ID] = true
		if len(t.AgentTokens) == 0 {
			v.failf(f+".agent_tokens", "at least one token hash is required (make one with `ferry-relay token`)")
		}
		for j, s := range t.AgentTokens {
			h, err := token.ParseHash(s)
			if err != nil {
				v.failf(fmt.Sprintf("%s.agent_tokens[%d]", f, j), "%v", err)
				continue
			}
			if other, dup := agentHash[h]; dup {
				v.failf(fmt.Sprintf("%s.agent_tokens[%d]", f, j), "the same token is already listed for tunnel %q; an agent token must map to one tunnel", other)
			}
			agentHash[h] = t.ID
			t.AgentHashes = append(t.AgentHashes, h)
		}
		if t.WebhookTarget != "" {
			checkURL(v, f+".webhook_target", t.WebhookTarget, "http", "https")
		}
		if t.WebhookTokenFile != "" {
			if t.WebhookTarget == "" {
				v.failf(f+".webhook_token_file", "is for webhook_target, which is not set")
			} else {
				t.WebhookToken = openSecretFile(v, f+".webhook_token_file", &t.WebhookTokenFile)
			}
		}
	}
	scanners := map[string]bool{}
	scannerHash := map[token.Hash]bool{}
	for i := range c.Scanners {
		s := &c.Scanners[i]
		f := fmt.Sprintf("scanners[%d]", i)
		if !idRE.MatchString(s.Name) {
			v.failf(f+".name", "%q must be 1-63 lowercase letters, digits, '.', '_' or '-'", s.Name)
		}
		if scanners[s.Name] {
			v.failf(f+".name", "duplicate scanner name %q", s.Name)
		}
		scanners[s.Name] = true
		h, err := token.ParseHash(s.Token)
		if err != nil {
			v.failf(f+".token", "%v", err)
		}
		if _, clash := agentHash[h]; clash {
			v.failf(f+".token", "is also an agent token; use separate tokens for agents and scanners")
		}
		if scannerHash[h] {
			v.failf(f+".token", "is already used by another scanner")
		}
		scannerHash[h] = true
		s.Hash = h
		if len(s.Tunnels) == 0 {
			v.failf(f+".tunnels", "list the tunnels this scanner may use")
		}
		if s.MaxStreams < 0 || s.MaxStreams > 1000000 {
			v.failf(f+".max_streams", "%d is out of range 0-1000000 (0: no limit of its own)", s.MaxStreams)
		}
		for j, id := range s.Tunnels {
			if !tunnels[id] {
				v.failf(fmt.Sprintf("%s.tunnels[%d]", f, j), "no tunnel with id %q is configured", id)
			}
		}
	}
	switch c.Registry.Backend {
	case "", "memory":
		c.Registry.Backend = "memory"
		if c.Registry.RedisURL != "" || c.Registry.AdvertiseURL != "" || c.Registry.InternalListen != "" || c.Registry.PeerSecretFile != "" {
			v.failf("registry.backend", "redis_url, advertise_url, internal_listen and peer_secret_file need backend: redis")
		}
	case "redis":
		c.Registry.validateRedis(v)
	default:
		v.failf("registry.backend", "%q is not memory or redis", c.Registry.Backend)
	}
	t := &c.Timeouts
	v.duration("timeouts.agent_handshake", &t.AgentHandshake, 10*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.agent_response", &t.AgentResponse, 150*time.Second, time.Second, time.Hour)
	v.duration("timeouts.keepalive", &t.Keepalive, 15*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.idle", &t.Idle, 5*time.Minute, time.Second, 24*time.Hour)
	v.duration("timeouts.header_read", &t.HeaderRead, 10*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.shutdown_grace", &t.ShutdownGrace, 30*time.Second, 0, time.Hour)
	v.count("limits.max_streams_per_tunnel", &c.Limits.MaxStreamsPerTunnel, 1024, 100000)
	v.count("limits.max_agent_connections_per_tunnel", &c.Limits.MaxAgentConnsPerTunnel, 256, 100000)
	v.checkLog(&c.Log)
}

func checkListen(v *validator, field, addr string) {
	if _, _, err := net.SplitHostPort(addr); err != nil {
		v.failf(field, "%q is not host:port (e.g. \":443\" or \"127.0.0.1:9090\")", addr)
	}
}

func checkTLSFiles(v *validator, field string, t *TLSFiles) {
	var err error
	if t.CertFile, err = ExpandCredentialsDir(t.CertFile); err != nil {
		v.failf(field+".cert_file", "%v", err)
		return
	}
	if t.KeyFile, err = ExpandCredentialsDir(t.KeyFile); err != nil {
		v.failf(field+".key_file", "%v", err)
		return
	}
	if t.CertFile == "" || t.KeyFile == "" {
		v.failf(field, "both cert_file and key_file are required")
		return
	}
	if _, err := tls.LoadX509KeyPair(t.CertFile, t.KeyFile); err != nil {
		v.failf(field, "cannot load certificate and key: %v", unwrapPathError(err))
	}
}

func checkURL(v *validator, field, raw string, schemes ...string) *url.URL {
	u, err := url.Parse(raw)
	if err != nil {
		v.failf(field, "%q is not a URL: %v", raw, err)
		return nil
	}
	okScheme := false
	for _, s := range schemes {
		okScheme = okScheme || u.Scheme == s
	}
	if !okScheme {
		v.failf(field, "%q: scheme must be one of %v", raw, schemes)
		return nil
	}
	if u.Host == "" {
		v.failf(field, "%q has no host", raw)
		return nil
	}
	if u.User != nil {
		v.failf(field, "credentials in the URL are not allowed; use the auth settings")
		return nil
	}
	return u
}
