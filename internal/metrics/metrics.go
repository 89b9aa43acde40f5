// Package metrics defines ferry's Prometheus metrics. Each daemon has its
// own registry (no global state), served on its admin listener only.
// Label values are bounded: tunnel ids and upstream names come from
// config, rule families from the policy, status codes from HTTP.
package metrics

import (
	"net/http"
	"runtime"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promauto"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ferry-tunnel/ferry/internal/version"
)

// latencyBuckets span a small REST call to a long clone.
var latencyBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}

func newRegistry(side string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	promauto.With(reg).NewGaugeVec(prometheus.GaugeOpts{
		Name: "ferry_" + side + "_build_info",
		Help: "Build information; always 1.",
	}, []string{"version", "revision", "goversion"}).WithLabelValues(version.Version, version.Commit(), runtime.Version()).Set(1)
	return reg
}

// Reloads counts a daemon's config reloads (SIGHUP). The config it
// started with was loaded successfully (it would not have started
// otherwise), so a fresh daemon reads 1 and its start time: an alert on
// "last reload failed" must not fire on every new daemon.
type Reloads struct {
	Total    *prometheus.CounterVec // result
	LastOK   prometheus.Gauge
	LastTime prometheus.Gauge
}

func newReloads(f promauto.Factory, side string) Reloads {
	r := Reloads{
		Total: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_" + side + "_config_reloads_total", Help: "Config reloads (SIGHUP) by result (success, failure).",
		}, []string{"result"}),
		LastOK: f.NewGauge(prometheus.GaugeOpts{
			Name: "ferry_" + side + "_config_last_reload_successful", Help: "1 if the config's last load (at start or by reload) succeeded, 0 if the last reload failed and the previous config is running.",
		}),
		LastTime: f.NewGauge(prometheus.GaugeOpts{
			Name: "ferry_" + side + "_config_last_reload_success_timestamp_seconds", Help: "When the config was last loaded successfully, at start or by reload (Unix time).",
		}),
	}
	r.LastOK.Set(1)
	r.LastTime.SetToCurrentTime()
	return r
}

// Succeeded records a reload that took effect.
func (r Reloads) Succeeded() {
	r.Total.WithLabelValues("success").Inc()
	r.LastOK.Set(1)
	r.LastTime.SetToCurrentTime()
}

// Failed records a reload refused (the running config stays).
func (r Reloads) Failed() {
	r.Total.WithLabelValues("failure").Inc()
	r.LastOK.Set(0)
}

// Handler serves a registry in the Prometheus exposition format.
func Handler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{Registry: reg})
}

// MethodClass groups HTTP methods so label values stay few.
func MethodClass(m string) string {
	switch m {
	case http.MethodGet, http.MethodHead:
		return "read"
	case http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete:
		return "write"
	}
	return "other"
}

// Code is an HTTP status as a label value.
func Code(status int) string { return strconv.Itoa(status) }

// Relay holds ferry-relay's metrics.
type Relay struct {
	Registry         *prometheus.Registry
	AgentConnections *prometheus.GaugeVec   // tunnel
	AgentConnects    *prometheus.CounterVec // tunnel, result
	AuthFailures     *prometheus.CounterVec // endpoint
	RateLimited      *prometheus.CounterVec // endpoint
	StreamsInFlight  *prometheus.GaugeVec   // tunnel
	ScannerOverLimit *prometheus.CounterVec // scanner
	Requests         *prometheus.CounterVec // tunnel, upstream, method_class, code
	RequestDuration  *prometheus.HistogramVec
	Bytes            *prometheus.CounterVec // tunnel, direction
	Webhooks         *prometheus.CounterVec // tunnel, result
	Forwarded        *prometheus.CounterVec // tunnel, direction
	RegistryUp       prometheus.Gauge
	Reloads          Reloads
	CertExpiry       *prometheus.GaugeVec // listener
}

// ForgetTunnel drops every series of a tunnel a reload removed. Its
// gauges would stay at their last value (an alert on a tunnel without
// agents would fire for good) and its counters would be exported forever.
// Connections and requests of the tunnel still finishing hold their own
// gauge children, so they do not bring the series back.
func (m *Relay) ForgetTunnel(id string) {
	l := prometheus.Labels{"tunnel": id}
	m.AgentConnections.DeletePartialMatch(l)
	m.AgentConnects.DeletePartialMatch(l)
	m.StreamsInFlight.DeletePartialMatch(l)
	m.Requests.DeletePartialMatch(l)
	m.RequestDuration.DeletePartialMatch(l)
	m.Bytes.DeletePartialMatch(l)
	m.Webhooks.DeletePartialMatch(l)
	m.Forwarded.DeletePartialMatch(l)
}

// ForgetScanner drops the series of a scanner a reload removed.
func (m *Relay) ForgetScanner(name string) {
	m.ScannerOverLimit.DeletePartialMatch(prometheus.Labels{"scanner": name})
}

// NewRelay registers the relay's metrics on a new registry.
func NewRelay() *Relay {
	reg := newRegistry("relay")
	f := promauto.With(reg)
	return &Relay{
		Registry: reg,
		AgentConnections: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_relay_agent_connections", Help: "Agent connections registered now, by tunnel.",
		}, []string{"tunnel"}),
		AgentConnects: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_agent_connects_total", Help: "Agent connection attempts by tunnel and result (accepted, handshake_failed, rebalanced, over_limit).",
		}, []string{"tunnel", "result"}),
		AuthFailures: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_auth_failures_total", Help: "Failed authentications by endpoint (agent, scanner, peer: the internal listener).",
		}, []string{"endpoint"}),
		RateLimited: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_rate_limited_total", Help: "Requests refused with 429 after repeated failed authentication, by endpoint.",
		}, []string{"endpoint"}),
		ScannerOverLimit: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_scanner_over_limit_total", Help: "Requests refused with 429 because the scanner had its max_streams in flight.",
		}, []string{"scanner"}),
		StreamsInFlight: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_relay_streams_in_flight", Help: "Scanner requests being carried through the tunnel now, by tunnel.",
		}, []string{"tunnel"}),
		Requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_requests_total", Help: "Scanner requests by tunnel, upstream, method class and status code.",
		}, []string{"tunnel", "upstream", "method_class", "code"}),
		RequestDuration: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ferry_relay_request_duration_seconds", Help: "Scanner request duration, first byte in to last byte out.", Buckets: latencyBuckets,
		}, []string{"tunnel"}),
		Bytes: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_bytes_total", Help: "Body bytes carried, by tunnel and direction (to_agent, to_scanner).",
		}, []string{"tunnel", "direction"}),
		Webhooks: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_webhook_deliveries_total", Help: "Webhook deliveries from agents, by tunnel and result (delivered, target_refused, target_unreachable, target_timeout, no_target, bad_request).",
		}, []string{"tunnel", "result"}),
		Forwarded: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_relay_forwarded_requests_total", Help: "Scanner requests forwarded between replicas, by tunnel and direction (out: to the replica holding the tunnel, in: from a replica).",
		}, []string{"tunnel", "direction"}),
		RegistryUp: f.NewGauge(prometheus.GaugeOpts{
			Name: "ferry_relay_registry_up", Help: "1 if the registry (Redis) answered the last operation, 0 if not (degraded: only tunnels held here are served).",
		}),
		Reloads: newReloads(f, "relay"),
		CertExpiry: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_relay_certificate_expiry_timestamp_seconds", Help: "When the TLS certificate the relay serves expires (Unix time), by listener (agent, scanner).",
		}, []string{"listener"}),
	}
}

// Agent holds ferry-agent's metrics.
type Agent struct {
	Registry         *prometheus.Registry
	RelayConnections prometheus.Gauge
	Reconnects       prometheus.Counter
	StreamsInFlight  prometheus.Gauge
	Requests         *prometheus.CounterVec // upstream, method_class, code, decision
	PolicyDenials    *prometheus.CounterVec // upstream, rule
	RequestDuration  *prometheus.HistogramVec
	Bytes            *prometheus.CounterVec // upstream, direction
	CredentialExpiry *prometheus.GaugeVec   // upstream
	CredentialValid  *prometheus.GaugeVec   // upstream

	// upstreams[].max_concurrent_requests, by upstream.
	UpstreamInFlight *prometheus.GaugeVec
	UpstreamWaiting  *prometheus.GaugeVec
	UpstreamBusy     *prometheus.CounterVec

	Reloads Reloads

	AuditLost prometheus.Counter

	// RelayCertExpiry has no labels; a Vec so that it is absent until
	// set (an alert on "expires within 14 days" must not fire on 0).
	RelayCertExpiry *prometheus.GaugeVec

	WebhookAccepted  prometheus.Counter
	WebhookRefused   *prometheus.CounterVec // reason
	WebhookForwarded prometheus.Counter
	WebhookRetries   prometheus.Counter
}

// NewAgent registers the agent's metrics on a new registry.
func NewAgent() *Agent {
	reg := newRegistry("agent")
	f := promauto.With(reg)
	return &Agent{
		Registry: reg,
		RelayConnections: f.NewGauge(prometheus.GaugeOpts{
			Name: "ferry_agent_relay_connections", Help: "Relay connections up now.",
		}),
		Reconnects: f.NewCounter(prometheus.CounterOpts{
			Name: "ferry_agent_reconnects_total", Help: "Relay connections lost or refused and retried.",
		}),
		StreamsInFlight: f.NewGauge(prometheus.GaugeOpts{
			Name: "ferry_agent_streams_in_flight", Help: "Requests from the tunnel being served now.",
		}),
		UpstreamInFlight: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_agent_upstream_requests_in_flight", Help: "Requests forwarded to the upstream and not yet finished.",
		}, []string{"upstream"}),
		UpstreamWaiting: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_agent_upstream_requests_waiting", Help: "Requests waiting for a slot under the upstream's max_concurrent_requests.",
		}, []string{"upstream"}),
		UpstreamBusy: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_agent_upstream_busy_total", Help: "Requests refused with 503 upstream_busy after waiting max_queue_wait for a slot.",
		}, []string{"upstream"}),
		Requests: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_agent_requests_total", Help: "Requests from the tunnel by upstream, method class, status code and policy decision.",
		}, []string{"upstream", "method_class", "code", "decision"}),
		PolicyDenials: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_agent_policy_denials_total", Help: "Requests the policy refused, by upstream and rule family.",
		}, []string{"upstream", "rule"}),
		RequestDuration: f.NewHistogramVec(prometheus.HistogramOpts{
			Name: "ferry_agent_request_duration_seconds", Help: "Request duration at the agent, including the upstream.", Buckets: latencyBuckets,
		}, []string{"upstream", "decision"}),
		Bytes: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_agent_bytes_total", Help: "Body bytes served, by upstream and direction (to_upstream, to_relay).",
		}, []string{"upstream", "direction"}),
		CredentialExpiry: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_agent_credential_expiry_timestamp_seconds", Help: "When the upstream credential expires (Unix time), where the upstream reports it.",
		}, []string{"upstream"}),
		CredentialValid: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_agent_credential_valid", Help: "1 if the upstream accepted the credential at the last check, else 0.",
		}, []string{"upstream"}),
		Reloads: newReloads(f, "agent"),
		RelayCertExpiry: f.NewGaugeVec(prometheus.GaugeOpts{
			Name: "ferry_agent_relay_certificate_expiry_timestamp_seconds", Help: "When the TLS certificate the relay presented at the last connection expires (Unix time); absent over ws://.",
		}, nil),
		AuditLost: f.NewCounter(prometheus.CounterOpts{
			Name: "ferry_agent_audit_lines_lost_total", Help: "Decisions the audit log could not record (disk full, file unwritable); the request itself was served. The error is in the agent log and ferry-agent status.",
		}),
		WebhookAccepted: f.NewCounter(prometheus.CounterOpts{
			Name: "ferry_agent_webhook_deliveries_accepted_total", Help: "Webhook deliveries accepted from Bitbucket and spooled.",
		}),
		WebhookRefused: f.NewCounterVec(prometheus.CounterOpts{
			Name: "ferry_agent_webhook_deliveries_refused_total", Help: "Webhook deliveries refused, by reason (signature, too_large, spool_full, busy, method, bad_body, spool_error).",
		}, []string{"reason"}),
		WebhookForwarded: f.NewCounter(prometheus.CounterOpts{
			Name: "ferry_agent_webhook_deliveries_forwarded_total", Help: "Webhook deliveries the cloud target confirmed (2xx) and that left the spool.",
		}),
		WebhookRetries: f.NewCounter(prometheus.CounterOpts{
			Name: "ferry_agent_webhook_delivery_retries_total", Help: "Failed forwarding attempts that will be retried.",
		}),
	}
}
