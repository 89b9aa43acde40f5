// Package statuspage renders the one-page HTML status views of the relay
// and the agent: one document, inline CSS, no external assets, refreshed
// by the browser every 10 seconds. It also holds the small bounded list of
// recent events those pages show.
package statuspage

import (
	"encoding/json"
	"html/template"
	"net/http"
	"net/http/pprof"
	"sync"
	"time"
)

const layout = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="10">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Title}}</title>
<style>
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:1.5rem;color:#1d2329;background:#fafbfc}
h1{font-size:1.3rem;margin:0 0 .2rem} h2{font-size:1.05rem;margin:1.6rem 0 .5rem}
.sub{color:#5c6670;margin-bottom:1rem}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e5}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid #eceff2;vertical-align:top}
th{background:#f1f3f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#137333;font-weight:600} .bad{color:#b3261e;font-weight:600} .warn{color:#a05a00;font-weight:600}
code{font:12px ui-monospace,Menlo,monospace;background:#f1f3f5;padding:0 .25rem;border-radius:3px}
.empty{color:#5c6670;font-style:italic}
</style></head><body>
{{template "content" .Data}}
<p class="sub">Rendered {{.Now.Format "2006-01-02 15:04:05 MST"}} · refreshes every 10 s · JSON at <code>{{.JSONPath}}</code> · metrics at <code>/metrics</code></p>
</body></html>`

var funcs = template.FuncMap{
	"ago": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return time.Since(t).Round(time.Second).String() + " ago"
	},
	"ts": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return t.UTC().Format("2006-01-02 15:04:05Z")
	},
}

// Page is a parsed status page.
type Page struct {
	title, jsonPath string
	t               *template.Template
}

// New parses content (a template defining the page body) into the layout.
func New(title, jsonPath, content string) *Page {
	t := template.Must(template.New("layout").Funcs(funcs).Parse(layout))
	template.Must(t.New("content").Parse(content))
	return &Page{title: title, jsonPath: jsonPath, t: t}
}

// Serve writes the page for data.
func (p *Page) Serve(w http.ResponseWriter, data any) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
	p.t.Execute(w, struct {
		Title, JSONPath string
		Now             time.Time
		Data            any
	}{p.title, p.jsonPath, time.Now(), data})
}

// Recent keeps the last n events, newest first when listed.
type Recent[T any] struct {
	mu    sync.Mutex
	items []T
	next  int
	full  bool
}

// NewRecent holds up to n events.
func NewRecent[T any](n int) *Recent[T] { return &Recent[T]{items: make([]T, n)} }

// Add records an event, dropping the oldest when full.
func (r *Recent[T]) Add(v T) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.items[r.next] = v
	r.next = (r.next + 1) % len(r.items)
	if r.next == 0 {
		r.full = true
	}
}

// List returns the events, newest first.
func (r *Recent[T]) List() []T {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := r.next
	if r.full {
		n = len(r.items)
	}
	out := make([]T, 0, n)
	for i := 1; i <= n; i++ {
		out = append(out, r.items[(r.next-i+len(r.items))%len(r.items)])
	}
	return out
}

// Admin is what an admin listener serves; both daemons fill it in.
type Admin struct {
	Page     *Page
	PageData func() any
	// Ready reports readiness and, when not ready, why.
	Ready func() (bool, string)
	// Degraded, if set, names a problem that leaves the process serving
	// (readyz stays 200, and says so). "": none.
	Degraded func() string
	Metrics  http.Handler
	// JSON serves each path's document (GET, indented).
	JSON map[string]func() any
	// Pprof adds Go's profiler under /debug/pprof/ (opt-in: a profile
	// costs CPU while it runs, and the listener may be reachable by more
	// than the operator).
	Pprof bool
}

// Handler serves /, /healthz, /readyz, /metrics and the JSON document.
func (a Admin) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, _ *http.Request) { a.Page.Serve(w, a.PageData()) })
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		w.Write([]byte("ok\n"))
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		if ok, why := a.Ready(); !ok {
			http.Error(w, why, http.StatusServiceUnavailable)
			return
		}
		if a.Degraded != nil {
			if why := a.Degraded(); why != "" {
				w.Write([]byte("ready, degraded: " + why + "\n"))
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	mux.Handle("GET /metrics", a.Metrics)
	for path, doc := range a.JSON {
		mux.HandleFunc("GET "+path, func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			enc.Encode(doc())
		})
	}
	if a.Pprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	return mux
}
