package config

import (
	"crypto/x509"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/ferry-tunnel/ferry/internal/audit"
	"github.com/ferry-tunnel/ferry/internal/policy"
	"github.com/ferry-tunnel/ferry/internal/readfile"
	"github.com/ferry-tunnel/ferry/internal/secret"
	"github.com/ferry-tunnel/ferry/proto"
)

// Agent is ferry-agent's configuration.
type Agent struct {
	AgentID     string        `yaml:"agent_id"` // default: host name
	Relay       RelayClient   `yaml:"relay"`
	Upstreams   []Upstream    `yaml:"upstreams"`
	Diagnostics Diagnostics   `yaml:"diagnostics"`
	Audit       Audit         `yaml:"audit"`
	Webhooks    Webhooks      `yaml:"webhooks"`
	Timeouts    AgentTimeouts `yaml:"timeouts"`
	Log         Log           `yaml:"log"`

	File string `yaml:"-"`
}

// AgentTimeouts bound every wait on a peer that may go silent.
type AgentTimeouts struct {
	Dial         time.Duration `yaml:"dial"`          // TCP connect to the relay or proxy
	TLSHandshake time.Duration `yaml:"tls_handshake"` // with the relay
	Upgrade      time.Duration `yaml:"upgrade"`       // the relay's answer to the WebSocket upgrade
	StreamHeader time.Duration `yaml:"stream_header"` // a new stream's ferry header
	Keepalive    time.Duration `yaml:"keepalive"`     // tunnel pings; keep below load-balancer idle timeouts
	Idle         time.Duration `yaml:"idle"`          // an upstream body that moves no byte this long is cut
	Drain        time.Duration `yaml:"drain"`         // requests in flight after SIGTERM
}

// RelayClient says how the agent reaches the relay.
type RelayClient struct {
	URL         string `yaml:"url"`
	TokenFile   string `yaml:"token_file"`
	TokenEnv    string `yaml:"token_env"`
	CAFile      string `yaml:"ca_file"`
	Connections int    `yaml:"connections"`
	ProxyURL    string `yaml:"proxy_url"`

	Token secret.Source  `yaml:"-"`
	CA    *x509.CertPool `yaml:"-"` // nil: system roots
}

// Upstream is one internal service the tunnel may reach.
type Upstream struct {
	Name         string   `yaml:"name"`
	URL          string   `yaml:"url"`
	CAFile       string   `yaml:"ca_file"`
	Auth         Auth     `yaml:"auth"`
	Profile      string   `yaml:"profile"`
	Repositories []string `yaml:"repositories"`
	Rules        []Rule   `yaml:"rules"`
	// PushRefPrefix is where bitbucket-dc-appsec may write (pushes,
	// branch creation, file edits).
	PushRefPrefix string `yaml:"push_ref_prefix"`
	// Aliases are other base URLs under which the upstream names itself
	// (Bitbucket's configured base URL); Location headers and LFS hrefs
	// on them are rewritten like those on URL.
	Aliases []string `yaml:"aliases"`
	// HideResponseHeaders are dropped from every response (headers that
	// name internal hosts). Default: Via, X-Served-By, X-Backend-Server.
	HideResponseHeaders []string `yaml:"hide_response_headers"`
	// ResponseTimeout bounds the wait for the upstream's response headers.
	ResponseTimeout time.Duration `yaml:"response_timeout"`
	// MaxConcurrentRequests bounds the requests this agent has in flight
	// to the upstream (0: no bound), so scanners cannot swamp it, whatever
	// the relay allows. Past it requests wait in arrival order, up to
	// MaxQueueWait (default 30 s: with the default response_timeout,
	// within the relay's 150 s wait for response headers), then get 503
	// upstream_busy. Reloadable.
	MaxConcurrentRequests int           `yaml:"max_concurrent_requests"`
	MaxQueueWait          time.Duration `yaml:"max_queue_wait"`

	CA     *x509.CertPool `yaml:"-"`
	Policy *policy.Policy `yaml:"-"`
}

// Auth is how the agent authenticates to an upstream.
type Auth struct {
	Type         string `yaml:"type"` // bearer or basic
	TokenFile    string `yaml:"token_file"`
	Username     string `yaml:"username"`
	PasswordFile string `yaml:"password_file"`

	Secret secret.Source `yaml:"-"` // the token (bearer) or password (basic)
}

// Rule is a user allow/deny rule on top of a profile.
type Rule struct {
	Methods []string `yaml:"methods"`
	Path    string   `yaml:"path"`
	Action  string   `yaml:"action"`
}

// Diagnostics is the agent's local admin listener.
type Diagnostics struct {
	Listen string `yaml:"listen"`
	Pprof  bool   `yaml:"pprof"` // Go's profiler at /debug/pprof/
}

// Webhooks is the local listener Bitbucket posts webhooks to and the
// spool that keeps them until the cloud target has them. Off unless
// listen is set.
type Webhooks struct {
	Listen        string `yaml:"listen"`
	SecretFile    string `yaml:"secret_file"` // HMAC secret Bitbucket signs with; unset: unsigned deliveries accepted
	SpoolDir      string `yaml:"spool_dir"`
	MaxBodyKB     int    `yaml:"max_body_kb"`          // one delivery's body (default 8192)
	SpoolMaxMB    int    `yaml:"spool_max_mb"`         // all spooled deliveries (default 1024)
	SpoolMaxCount int    `yaml:"spool_max_deliveries"` // default 100000
	Lanes         int    `yaml:"lanes"`                // deliveries forwarded in parallel; one repository always uses the same lane (default 4)
	// TLS, if set, makes the listener HTTPS: Bitbucket posts to
	// https://agent:port/. Renewed files are picked up within a minute.
	TLS *TLSFiles `yaml:"tls"`

	Secret secret.Source `yaml:"-"`
}

// Enabled reports whether the webhook listener runs.
func (w *Webhooks) Enabled() bool { return w.Listen != "" }

// Audit is the decision log.
type Audit struct {
	Path      string `yaml:"path"`        // empty: main log only; "-": standard output (journald)
	MaxSizeMB int    `yaml:"max_size_mb"` // rotate past this size (default 100)
	MaxFiles  int    `yaml:"max_files"`   // rotated files kept (default 5)
}

// LoadAgent reads and validates an agent config file.
func LoadAgent(path string) (*Agent, error) { return load(path, ParseAgent) }

// ParseAgent validates agent config bytes; file is used in messages.
func ParseAgent(file string, data []byte) (*Agent, error) {
	return parse(file, data, &Agent{File: file}, (*Agent).validate)
}

func (c *Agent) validate(v *validator) {
	if c.AgentID == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "agent"
		}
		c.AgentID = h
	}
	r := &c.Relay
	if r.URL == "" {
		v.failf("relay.url", "required, e.g. wss://relay.example.com%s", proto.ConnectPath)
	} else if u := checkURL(v, "relay.url", r.URL, "wss", "ws"); u != nil && (u.Path == "" || u.Path == "/") {
		r.URL = strings.TrimSuffix(r.URL, "/") + proto.ConnectPath
	}
	switch {
	case r.TokenFile != "" && r.TokenEnv != "":
		v.failf("relay.token_file", "set token_file or token_env, not both")
	case r.TokenFile != "":
		r.Token = openSecretFile(v, "relay.token_file", &r.TokenFile)
	case r.TokenEnv != "":
		s, err := secret.NewEnv(r.TokenEnv)
		if err != nil {
			v.failf("relay.token_env", "%v", err)
		}
		r.Token = s
	default:
		v.failf("relay", "token_file or token_env is required")
	}
	r.CA = loadCA(v, "relay.ca_file", &r.CAFile)
	v.count("relay.connections", &r.Connections, 2, 16)
	if r.ProxyURL != "" {
		// user:password for the proxy's basic auth may ride in the URL, as
		// with HTTPS_PROXY; it is redacted wherever the URL is printed.
		if u, err := url.Parse(r.ProxyURL); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			v.failf("relay.proxy_url", "want http://[user:password@]host:port")
		}
	}
	if len(c.Upstreams) == 0 {
		v.failf("upstreams", "at least one upstream is required")
	}
	names := map[string]bool{}
	for i := range c.Upstreams {
		c.Upstreams[i].validate(v, fmt.Sprintf("upstreams[%d]", i), names)
	}
	if c.Diagnostics.Listen == "" {
		c.Diagnostics.Listen = "127.0.0.1:9091"
	}
	checkListen(v, "diagnostics.listen", c.Diagnostics.Listen)
	if c.Audit.Path != "" && c.Audit.Path != "-" {
		var err error
		if c.Audit.Path, err = ExpandCredentialsDir(c.Audit.Path); err != nil {
			v.failf("audit.path", "%v", err)
		} else if err := audit.CheckPath(c.Audit.Path); err != nil {
			v.failf("audit.path", "%v (\"-\" writes the lines to standard output)", err)
		}
	}
	switch {
	case c.Audit.MaxSizeMB == 0:
		c.Audit.MaxSizeMB = 100
	case c.Audit.MaxSizeMB < 0:
		v.failf("audit.max_size_mb", "must be positive")
	}
	v.count("audit.max_files", &c.Audit.MaxFiles, 5, 1000)
	c.Webhooks.validate(v)
	t := &c.Timeouts
	v.duration("timeouts.dial", &t.Dial, 10*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.tls_handshake", &t.TLSHandshake, 10*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.upgrade", &t.Upgrade, 15*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.stream_header", &t.StreamHeader, 10*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.keepalive", &t.Keepalive, 15*time.Second, 100*time.Millisecond, 5*time.Minute)
	v.duration("timeouts.idle", &t.Idle, 5*time.Minute, time.Second, 24*time.Hour)
	v.duration("timeouts.drain", &t.Drain, 30*time.Second, 0, time.Hour)
	v.checkLog(&c.Log)
}

func (u *Upstream) validate(v *validator, f string, names map[string]bool) {
	if !idRE.MatchString(u.Name) {
		v.failf(f+".name", "%q must be 1-63 lowercase letters, digits, '.', '_' or '-' (it appears in scanner URLs)", u.Name)
	}
	if names[u.Name] {
		v.failf(f+".name", "duplicate upstream name %q", u.Name)
	}
	names[u.Name] = true
	if pu := checkURL(v, f+".url", u.URL, "https", "http"); pu != nil {
		if pu.RawQuery != "" || pu.Fragment != "" {
			v.failf(f+".url", "must not have a query or fragment")
		}
		u.URL = strings.TrimSuffix(u.URL, "/")
	}
	u.CA = loadCA(v, f+".ca_file", &u.CAFile)
	for i, a := range u.Aliases {
		if au := checkURL(v, fmt.Sprintf("%s.aliases[%d]", f, i), a, "https", "http"); au != nil && (au.RawQuery != "" || au.Fragment != "") {
			v.failf(fmt.Sprintf("%s.aliases[%d]", f, i), "must not have a query or fragment")
		}
	}
	if u.HideResponseHeaders == nil {
		u.HideResponseHeaders = []string{"Via", "X-Served-By", "X-Backend-Server"}
	}
	for i, h := range u.HideResponseHeaders {
		if h == "" || strings.ContainsAny(h, " :\t\r\n") {
			v.failf(fmt.Sprintf("%s.hide_response_headers[%d]", f, i), "%q is not a header name", h)
		}
	}
	switch {
	case u.ResponseTimeout == 0:
		u.ResponseTimeout = 2 * time.Minute
	case u.ResponseTimeout < 0:
		v.failf(f+".response_timeout", "must be positive")
	}
	if u.MaxConcurrentRequests < 0 || u.MaxConcurrentRequests > 100000 {
		v.failf(f+".max_concurrent_requests", "%d is out of range 0-100000 (0: no limit)", u.MaxConcurrentRequests)
	}
	v.duration(f+".max_queue_wait", &u.MaxQueueWait, 30*time.Second, 100*time.Millisecond, 10*time.Minute)
	switch u.Auth.Type {
	case "bearer":
		if u.Auth.Username != "" || u.Auth.PasswordFile != "" {
			v.failf(f+".auth", "bearer takes token_file only")
		}
		u.Auth.Secret = openSecretFile(v, f+".auth.token_file", &u.Auth.TokenFile)
	case "basic":
		if u.Auth.Username == "" {
			v.failf(f+".auth.username", "required for basic auth")
		}
		if u.Auth.TokenFile != "" {
			v.failf(f+".auth.token_file", "basic auth takes password_file, not token_file")
		}
		u.Auth.Secret = openSecretFile(v, f+".auth.password_file", &u.Auth.PasswordFile)
	case "":
		v.failf(f+".auth.type", "required: bearer or basic (the credential ferry adds to every request)")
	default:
		v.failf(f+".auth.type", "%q is not bearer or basic", u.Auth.Type)
	}
	if u.Profile == "" {
		v.failf(f+".profile", "required: one of %s", strings.Join(policy.ProfileNames(), ", "))
	}
	var rules []policy.Rule
	for j, r := range u.Rules {
		name := fmt.Sprintf("%s.rules[%d]", f, j)
		cr, err := policy.CompileRule(fmt.Sprintf("rules[%d]", j), policy.RuleSpec{Methods: r.Methods, Path: r.Path, Action: r.Action})
		if err != nil {
			v.failf(name, "%v", err)
		}
		rules = append(rules, cr)
	}
	if v.failed() {
		return
	}
	p, err := policy.New(policy.Options{Profile: u.Profile, Rules: rules, Repositories: u.Repositories, PushRefPrefix: u.PushRefPrefix})
	if err != nil {
		// policy errors start with the option's name: "profile: ...".
		opt, msg, _ := strings.Cut(err.Error(), ": ")
		v.failf(f+"."+opt, "%s", msg)
	}
	u.Policy = p
}

func loadCA(v *validator, field string, path *string) *x509.CertPool {
	if *path == "" {
		return nil
	}
	p, err := ExpandCredentialsDir(*path)
	if err != nil {
		v.failf(field, "%v", err)
		return nil
	}
	*path = p
	pem, err := readfile.Regular(p, maxCABundle)
	if err != nil {
		v.failf(field, "cannot read: %v", unwrapPathError(err))
		return nil
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		v.failf(field, "%s holds no PEM certificate", p)
		return nil
	}
	return pool
}

func (w *Webhooks) validate(v *validator) {
	if !w.Enabled() {
		if w.SecretFile != "" || w.SpoolDir != "" {
			v.failf("webhooks.listen", "required when webhooks are configured (e.g. \"0.0.0.0:8181\")")
		}
		return
	}
	checkListen(v, "webhooks.listen", w.Listen)
	if w.SecretFile != "" {
		w.Secret = openSecretFile(v, "webhooks.secret_file", &w.SecretFile)
	}
	if w.SpoolDir == "" {
		v.failf("webhooks.spool_dir", "required: a directory on persistent disk, e.g. /var/lib/ferry/spool")
	} else {
		var err error
		if w.SpoolDir, err = ExpandCredentialsDir(w.SpoolDir); err != nil {
			v.failf("webhooks.spool_dir", "%v", err)
		}
	}
	v.count("webhooks.max_body_kb", &w.MaxBodyKB, 8192, 64<<10)
	v.count("webhooks.spool_max_mb", &w.SpoolMaxMB, 1024, 1<<20)
	v.count("webhooks.spool_max_deliveries", &w.SpoolMaxCount, 100000, 10_000_000)
	v.count("webhooks.lanes", &w.Lanes, 4, 16) // the relay serves 16 deliveries at once per connection
	if w.TLS != nil {
		checkTLSFiles(v, "webhooks.tls", w.TLS)
	}
}
