package agent

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/yamux"

	"github.com/ferry-tunnel/ferry/internal/certfile"
	"github.com/ferry-tunnel/ferry/internal/config"
	"github.com/ferry-tunnel/ferry/internal/httpx"
	"github.com/ferry-tunnel/ferry/internal/logging"
	"github.com/ferry-tunnel/ferry/internal/spool"
	"github.com/ferry-tunnel/ferry/proto"
)

const doctorStepTimeout = 10 * time.Second

// doctor prints one line per check, in order, with a hint under failures.
type doctor struct {
	out            io.Writer
	passed, failed int
}

func (d *doctor) pass(name, format string, args ...any) {
	d.passed++
	fmt.Fprintf(d.out, "✓ %-22s %s\n", name, fmt.Sprintf(format, args...))
}

func (d *doctor) fail(name, detail, hint string) {
	d.failed++
	fmt.Fprintf(d.out, "✗ %-22s %s\n", name, detail)
	if hint != "" {
		fmt.Fprintf(d.out, "  %-22s hint: %s\n", "", hint)
	}
}

func (d *doctor) skip(name, why string) {
	fmt.Fprintf(d.out, "- %-22s skipped: %s\n", name, why)
}

// Doctor runs ferry-agent doctor: config, DNS, TCP (directly or through
// the proxy), TLS, the WebSocket upgrade with the agent token, then each
// upstream and its credential. It reports whether every check passed.
func Doctor(ctx context.Context, path string, out io.Writer) bool {
	d := &doctor{out: out}
	cfg, err := config.LoadAgent(path)
	if err != nil {
		d.fail("config", err.Error(), "fix the field named above; `ferry-agent --config` refuses this file too")
		fmt.Fprintf(out, "\n1 check failed; the others need a valid config\n")
		return false
	}
	names := make([]string, len(cfg.Upstreams))
	for i, u := range cfg.Upstreams {
		names[i] = u.Name
	}
	d.pass("config", "%s: relay %s, upstreams %s", path, cfg.Relay.URL, strings.Join(names, ", "))
	a, err := New(cfg, logging.Discard())
	if err != nil {
		d.fail("config", err.Error(), "")
		return false
	}
	defer a.relay.Load().client.CloseIdleConnections()
	a.doctorRelay(ctx, d)
	ups := a.upstreams()
	for _, name := range ups.names {
		a.doctorUpstream(ctx, d, ups.byName[name])
	}
	doctorAudit(d, &cfg.Audit)
	if cfg.Webhooks.Enabled() {
		doctorWebhooks(d, &cfg.Webhooks)
	}
	if d.failed == 0 {
		fmt.Fprintf(out, "\nall %d checks passed\n", d.passed)
		return true
	}
	fmt.Fprintf(out, "\n%d of %d checks failed\n", d.failed, d.passed+d.failed)
	return false
}

func (a *Agent) doctorRelay(ctx context.Context, d *doctor) {
	u, _ := url.Parse(a.config().Relay.URL)
	host, target := u.Hostname(), httpx.HostPort(u)
	later := []string{"tcp", "tls", "relay"}
	skipRest := func(from int, why string) {
		for _, n := range later[from:] {
			d.skip(n, why)
		}
	}
	proxy, err := a.relay.Load().proxyFor()
	if err != nil {
		d.fail("dns", "proxy settings: "+err.Error(), "check relay.proxy_url or HTTPS_PROXY")
		skipRest(0, "no usable proxy setting")
		return
	}

	// DNS: of the relay, or of the proxy, which then resolves the relay.
	lookup := host
	if proxy != nil {
		lookup = proxy.Hostname()
	}
	if ip := net.ParseIP(lookup); ip != nil {
		d.pass("dns", "%s is an IP address; nothing to resolve", lookup)
	} else {
		lctx, cancel := context.WithTimeout(ctx, doctorStepTimeout)
		addrs, err := net.DefaultResolver.LookupHost(lctx, lookup)
		cancel()
		if err != nil {
			hint := "check this host's DNS (/etc/resolv.conf)"
			if proxy == nil {
				hint += "; if only an egress proxy can resolve outside names, set relay.proxy_url"
			}
			d.fail("dns", fmt.Sprintf("cannot resolve %s: %v", lookup, unwrapDNS(err)), hint)
			skipRest(0, "DNS failed")
			return
		}
		if proxy != nil {
			d.pass("dns", "proxy %s → %s (the proxy resolves %s)", lookup, strings.Join(addrs, ", "), host)
		} else {
			d.pass("dns", "%s → %s", host, strings.Join(addrs, ", "))
		}
	}

	// TCP, directly or through CONNECT.
	conn, detail, err := doctorDial(ctx, proxy, target)
	if err != nil {
		hint := "is the relay up, and does the firewall allow outbound connections to " + target + "? (behind an egress proxy: set relay.proxy_url)"
		if proxy != nil {
			hint = ""
			var pr *proxyError
			if !errors.As(err, &pr) {
				hint = "is the proxy " + proxy.Redacted() + " up and reachable from this host?"
			}
		}
		d.fail("tcp", err.Error(), hint)
		skipRest(1, "no connection")
		return
	}
	d.pass("tcp", "%s", detail)

	// TLS, on that connection, as the agent would verify it.
	if u.Scheme == "wss" {
		tc := tls.Client(conn, &tls.Config{ServerName: host, RootCAs: a.config().Relay.CA, MinVersion: tls.VersionTLS12})
		hctx, cancel := context.WithTimeout(ctx, doctorStepTimeout)
		err := tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			conn.Close()
			detail, hint := explainTLS(err, a.config().Relay.CAFile)
			d.fail("tls", detail, hint)
			skipRest(2, "TLS failed")
			return
		}
		leaf := tc.ConnectionState().PeerCertificates[0]
		days := int(time.Until(leaf.NotAfter).Hours() / 24)
		note := ""
		if days < 14 {
			note = " — renew it soon"
		}
		d.pass("tls", "%s, certificate %s issued by %s, valid until %s (%d days)%s", tlsVersion(tc.ConnectionState().Version),
			certName(leaf), leaf.Issuer.CommonName, leaf.NotAfter.Format("2006-01-02"), days, note)
		tc.Close()
	} else {
		conn.Close()
		d.pass("tls", "not used: relay.url is ws:// (only behind a TLS-terminating load balancer or in tests)")
	}

	// The real thing: WebSocket upgrade, token, hello.
	hctx, cancel := context.WithTimeout(ctx, 2*doctorStepTimeout)
	defer cancel()
	ws, _, err := a.dial(hctx, a.relay.Load())
	if err != nil {
		hint := ""
		if strings.Contains(err.Error(), "401") {
			hint = "the token in " + a.config().Relay.Token.String() + " matches no agent_tokens entry on the relay; `ferry-relay token` prints a token and its sha256 line, and the relay config needs that line"
		}
		d.fail("relay", err.Error(), hint)
		return
	}
	wsConn := proto.WebSocketConn(hctx, ws, nil)
	sess, err := yamux.Client(wsConn, proto.YamuxConfig(logging.Discard(), a.config().Timeouts.Keepalive, proto.AgentStreamWindow))
	if err != nil {
		wsConn.Close()
		d.fail("relay", err.Error(), "")
		return
	}
	defer sess.Close()
	_, welcome, err := a.hello(sess, proto.MaxRebalance) // never asked to rebalance
	if err != nil {
		d.fail("relay", err.Error(), "agent and relay versions may be incompatible")
		return
	}
	d.pass("relay", "agent token (%s) accepted for tunnel %s by relay %s", a.config().Relay.Token.String(), welcome.Tunnel, welcome.RelayID)
}

// proxyError is a CONNECT the proxy refused.
type proxyError struct{ err error }

func (p *proxyError) Error() string { return p.err.Error() }

// doctorDial connects to target, through proxy (HTTP CONNECT) if set.
func doctorDial(ctx context.Context, proxy *url.URL, target string) (net.Conn, string, error) {
	dialer := &net.Dialer{Timeout: doctorStepTimeout}
	if proxy == nil {
		start := time.Now()
		c, err := dialer.DialContext(ctx, "tcp", target)
		if err != nil {
			return nil, "", fmt.Errorf("cannot connect to %s: %v", target, unwrapOp(err))
		}
		return c, fmt.Sprintf("connected to %s (%s) in %s", target, c.RemoteAddr(), time.Since(start).Round(time.Millisecond)), nil
	}
	paddr := httpx.HostPort(proxy)
	c, err := dialer.DialContext(ctx, "tcp", paddr)
	if err != nil {
		return nil, "", fmt.Errorf("cannot connect to the egress proxy %s: %v", proxy.Redacted(), unwrapOp(err))
	}
	if proxy.Scheme == "https" {
		tc := tls.Client(c, &tls.Config{ServerName: proxy.Hostname(), MinVersion: tls.VersionTLS12})
		if err := tc.HandshakeContext(ctx); err != nil {
			c.Close()
			return nil, "", fmt.Errorf("TLS to the egress proxy %s: %v", proxy.Redacted(), err)
		}
		c = tc
	}
	c.SetDeadline(time.Now().Add(doctorStepTimeout))
	req := "CONNECT " + target + " HTTP/1.1\r\nHost: " + target + "\r\n"
	if proxy.User != nil {
		pw, _ := proxy.User.Password()
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(proxy.User.Username()+":"+pw)) + "\r\n"
	}
	if _, err := io.WriteString(c, req+"\r\n"); err != nil {
		c.Close()
		return nil, "", fmt.Errorf("egress proxy %s: %v", proxy.Redacted(), err)
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		c.Close()
		return nil, "", fmt.Errorf("egress proxy %s answered CONNECT with garbage: %v", proxy.Redacted(), err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		c.Close()
		return nil, "", &proxyError{ProxyRefusal(proxy, target, resp.StatusCode, resp.Status)}
	}
	if br.Buffered() > 0 {
		c.Close()
		return nil, "", fmt.Errorf("egress proxy %s sent data after CONNECT", proxy.Redacted())
	}
	c.SetDeadline(time.Time{})
	return c, fmt.Sprintf("%s reachable through egress proxy %s (CONNECT %s)", target, proxy.Redacted(), resp.Status), nil
}

// explainTLS turns a handshake error into what to do about it.
func explainTLS(err error, caFile string) (string, string) {
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	var cv *tls.CertificateVerificationError
	if errors.As(err, &cv) && len(cv.UnverifiedCertificates) > 0 {
		err = cv.Err
	}
	ca := "relay.ca_file is not set (system roots)"
	if caFile != "" {
		ca = "relay.ca_file is " + caFile
	}
	switch {
	case errors.As(err, &ua):
		issuer := ""
		if ua.Cert != nil {
			issuer = " (issuer: " + ua.Cert.Issuer.String() + ")"
		}
		return "certificate signed by an unknown authority" + issuer,
			ca + "; if a TLS-inspecting proxy sits in the path or the relay uses a private CA, put that CA in relay.ca_file"
	case errors.As(err, &hn):
		return err.Error(), "relay.url must use a name the certificate is issued for"
	case errors.As(err, &ci) && ci.Reason == x509.Expired:
		return "certificate expired or not yet valid: " + err.Error(), "the relay's certificate must be renewed (or this host's clock is wrong)"
	}
	return "TLS handshake failed: " + err.Error(), "is the relay speaking TLS on this port? (ws:// is for plaintext relays)"
}

func certName(c *x509.Certificate) string {
	if len(c.DNSNames) > 0 {
		return strings.Join(c.DNSNames, ",")
	}
	if len(c.IPAddresses) > 0 {
		return c.IPAddresses[0].String()
	}
	return c.Subject.CommonName
}

func tlsVersion(v uint16) string {
	switch v {
	case tls.VersionTLS13:
		return "TLS 1.3"
	case tls.VersionTLS12:
		return "TLS 1.2"
	}
	return fmt.Sprintf("TLS 0x%x", v)
}

func unwrapOp(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Err
	}
	return err
}

func unwrapDNS(err error) string {
	var de *net.DNSError
	if errors.As(err, &de) {
		return de.Err
	}
	return err.Error()
}

func (a *Agent) doctorUpstream(ctx context.Context, d *doctor, u *upstream) {
	name := "upstream " + u.cfg.Name
	cctx, cancel := context.WithTimeout(ctx, 2*doctorStepTimeout)
	defer cancel()
	rep, err := u.checkCredential(cctx)
	defer u.transport.CloseIdleConnections()
	if err != nil {
		hint := "can this host reach " + u.cfg.URL + "? (firewall, DNS, port)"
		if strings.Contains(classify(err), "TLS") {
			hint = "set upstreams[].ca_file to the CA that issued " + u.cfg.Name + "'s certificate"
		}
		d.fail(name, fmt.Sprintf("%s: %s (%v)", u.cfg.URL, classify(err), unwrapOp(err)), hint)
		d.skip("credential "+u.cfg.Name, "upstream unreachable")
		return
	}
	d.pass(name, "%s reachable", u.cfg.URL)
	cname := "credential " + u.cfg.Name
	if !rep.Valid {
		file := u.cfg.Auth.TokenFile
		if u.cfg.Auth.Type == "basic" {
			file = u.cfg.Auth.PasswordFile
		}
		d.fail(cname, rep.Problem, "create a new HTTP access token for the service account and put it in "+file+" (the agent re-reads it; no restart needed)")
		return
	}
	exp := "no expiry reported"
	if !rep.Expiry.IsZero() {
		days := int(time.Until(rep.Expiry).Hours() / 24)
		exp = fmt.Sprintf("expires %s (%d days)", rep.Expiry.Format("2006-01-02"), days)
		if days < 14 {
			exp += " — rotate it soon"
		}
	}
	d.pass(cname, "accepted as %s; %s", rep.User, exp)
}

// doctorWebhooks checks the webhook secret and spool: readable, writable,
// and not holding deliveries that have waited long (something downstream
// is refusing them).
// doctorAudit checks that the audit log can be written and that its disk
// has room for the next file. It creates nothing that stays: doctor often
// runs as root, and a file it left would be root's.
func doctorAudit(d *doctor, c *config.Audit) {
	switch c.Path {
	case "":
		d.skip("audit log", "audit.path is not set: decisions are not recorded")
		return
	case "-":
		d.pass("audit log", "standard output (journald)")
		return
	}
	const hint = "the agent's user must be able to create and append to audit.path (LogsDirectory= under systemd)"
	if f, err := os.OpenFile(c.Path, os.O_WRONLY|os.O_APPEND, 0); err == nil {
		st, err := f.Stat()
		f.Close()
		// Config validation refused the other kinds that are not files.
		if err == nil && st.Mode()&fs.ModeCharDevice != 0 {
			d.pass("audit log", "%s is a device: the lines are written to it, never rotated", c.Path)
			return
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		d.fail("audit log", err.Error(), hint)
		return
	} else if probe, err := os.CreateTemp(filepath.Dir(c.Path), ".doctor-*"); err != nil {
		d.fail("audit log", "cannot create "+c.Path+": "+err.Error(), hint)
		return
	} else {
		probe.Close()
		os.Remove(probe.Name())
	}
	var fs syscall.Statfs_t
	if err := syscall.Statfs(filepath.Dir(c.Path), &fs); err != nil {
		d.fail("audit log", err.Error(), "")
		return
	}
	freeMiB := int64(fs.Bavail) * fs.Bsize >> 20
	if freeMiB < int64(c.MaxSizeMB) {
		d.fail("audit log", fmt.Sprintf("%s writable, but its disk has %d MiB free, less than one file (audit.max_size_mb %d)", c.Path, freeMiB, c.MaxSizeMB),
			"free space, or lower audit.max_size_mb; decisions the log cannot take are counted in ferry_agent_audit_lines_lost_total")
		return
	}
	d.pass("audit log", "%s writable; %d MiB free, up to %d MiB kept (%d files of %d MiB)", c.Path, freeMiB, (c.MaxFiles+1)*c.MaxSizeMB, c.MaxFiles+1, c.MaxSizeMB)
}

func doctorWebhooks(d *doctor, w *config.Webhooks) {
	if w.Secret != nil {
		if _, err := w.Secret.Value(); err != nil {
			d.fail("webhook secret", err.Error(), "webhooks.secret_file must be readable by the agent; deliveries are refused until it is")
		} else {
			d.pass("webhook secret", "%s readable; deliveries must carry X-Hub-Signature", w.SecretFile)
		}
	} else {
		d.pass("webhook secret", "not set: unsigned deliveries are accepted (set webhooks.secret_file and the same secret in Bitbucket)")
	}
	doctorWebhookTLS(d, w)
	if err := os.MkdirAll(w.SpoolDir, 0o700); err != nil {
		d.fail("webhook spool", err.Error(), "webhooks.spool_dir must be a directory the agent can create and write (StateDirectory= under systemd)")
		return
	}
	probe, err := os.CreateTemp(w.SpoolDir, ".doctor-*")
	if err != nil {
		d.fail("webhook spool", "cannot write in "+w.SpoolDir+": "+err.Error(), "give the agent's user write access to webhooks.spool_dir")
		return
	}
	probe.Close()
	os.Remove(probe.Name())
	st, err := spool.Inspect(w.SpoolDir)
	if err != nil {
		d.fail("webhook spool", err.Error(), "")
		return
	}
	summary := fmt.Sprintf("%s writable; %d deliveries waiting (%d bytes), %d quarantined", w.SpoolDir, st.Spooled, st.Bytes, st.Quarantined)
	switch {
	case st.Spooled > 0 && time.Since(st.Oldest) > time.Hour:
		d.fail("webhook spool", summary+fmt.Sprintf("; the oldest has waited %s", time.Since(st.Oldest).Round(time.Second)),
			"deliveries are not getting out: see last_error under webhooks in `ferry-agent status` (relay unreachable, no webhook_target, or the target refusing)")
	case st.Quarantined > 0:
		d.fail("webhook spool", summary, "corrupt spool files were moved to "+filepath.Join(w.SpoolDir, "quarantine")+"; inspect them, then delete them")
	default:
		d.pass("webhook spool", "%s", summary)
	}
}

// doctorWebhookTLS says how long the webhook listener's certificate lasts.
func doctorWebhookTLS(d *doctor, w *config.Webhooks) {
	if w.TLS == nil {
		return
	}
	src, err := certfile.Load(w.TLS.CertFile, w.TLS.KeyFile)
	if err != nil {
		d.fail("webhook tls", err.Error(), "webhooks.tls must name a certificate and its key, readable by the agent")
		return
	}
	na := src.NotAfter()
	if level, _ := certfile.Urgency(na); level >= slog.LevelError {
		d.fail("webhook tls", fmt.Sprintf("%s expired on %s", w.TLS.CertFile, na.Format(time.DateOnly)),
			"renew it: Bitbucket refuses to post to an expired certificate (the agent picks renewed files up within a minute)")
		return
	}
	d.pass("webhook tls", "%s valid until %s (%d days left)", w.TLS.CertFile, na.Format(time.DateOnly), certfile.DaysLeft(na))
}
