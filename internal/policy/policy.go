// Package policy decides, on the agent, which scanner requests may reach an
// upstream. It is default-deny: a request passes only when a rule of the
// upstream's profile or its own rules allows it, no never-allowed rule
// matches, and it falls inside the upstream's repository scope.
package policy

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"path"
	"sort"
	"strings"
)

// Decision is the outcome for one request.
type Decision struct {
	Allow bool
	// Path is the canonical path that was checked; forward exactly this.
	Path string
	// Rule names what decided: a profile family ("rest-read"), a user rule
	// ("rules[2]"), a never-allowed family ("never:admin"), "scope",
	// "normalise" or "default-deny".
	Rule string
	// Reason is a sentence for the scanner and the log.
	Reason string
	// Status is the HTTP status to answer a refusal with (400 or 403).
	Status int
	// Inspect, on an allow, is the body check still to pass (CheckBody).
	Inspect Inspection
}

// Rule is one allow or deny rule.
type Rule struct {
	Name    string // family name reported in decisions
	Methods map[string]bool
	Path    pattern
	// Query requires exact values of query keys (each must appear once).
	Query   map[string]string
	Deny    bool
	Inspect Inspection
}

func (r *Rule) matches(method string, segs []string, q url.Values) bool {
	if !r.Methods[method] || !matchSegs(r.Path.segs, segs) {
		return false
	}
	for k, want := range r.Query {
		if vs := q[k]; len(vs) != 1 || vs[0] != want {
			return false
		}
	}
	return true
}

// RuleSpec is the config form of a user rule.
type RuleSpec struct {
	Methods []string
	Path    string
	Action  string // "allow" (default) or "deny"
}

// CompileRule validates a user rule. name is how decisions will cite it.
func CompileRule(name string, s RuleSpec) (Rule, error) {
	r := Rule{Name: name, Methods: map[string]bool{}}
	if len(s.Methods) == 0 {
		return r, errors.New("methods: at least one HTTP method is required")
	}
	for _, m := range s.Methods {
		m = strings.ToUpper(m)
		if !knownMethods[m] {
			return r, fmt.Errorf("methods: %q is not an HTTP method ferry forwards", m)
		}
		r.Methods[m] = true
	}
	p, err := compilePattern(s.Path)
	if err != nil {
		return r, fmt.Errorf("path: %v", err)
	}
	r.Path = p
	switch s.Action {
	case "", "allow":
	case "deny":
		r.Deny = true
	default:
		return r, fmt.Errorf("action: %q is not allow or deny", s.Action)
	}
	return r, nil
}

var knownMethods = map[string]bool{
	http.MethodGet: true, http.MethodHead: true, http.MethodPost: true, http.MethodPut: true,
	http.MethodPatch: true, http.MethodDelete: true, http.MethodOptions: true,
}

// Policy is the compiled policy of one upstream. It is immutable and safe
// for concurrent use.
type Policy struct {
	profile    string
	allow      []Rule // profile rules
	user       []Rule // user rules, in order
	scope      *scope // nil: all repositories
	pushPrefix string
}

// Options describe one upstream's policy.
type Options struct {
	Profile      string
	Rules        []Rule   // user rules, from CompileRule
	Repositories []string // scope; empty: all repositories
	// PushRefPrefix is where pushes, branch creation and file edits may
	// write; empty: DefaultPushRefPrefix.
	PushRefPrefix string
}

// New compiles a policy. Errors name the option that is wrong.
func New(o Options) (*Policy, error) {
	prof, ok := profiles[o.Profile]
	if !ok {
		return nil, fmt.Errorf("profile: unknown profile %q (known: %s)", o.Profile, strings.Join(ProfileNames(), ", "))
	}
	p := &Policy{profile: o.Profile, allow: prof, user: o.Rules, pushPrefix: o.PushRefPrefix}
	if p.pushPrefix == "" {
		p.pushPrefix = DefaultPushRefPrefix
	}
	if !strings.HasPrefix(p.pushPrefix, "refs/") || !strings.HasSuffix(p.pushPrefix, "/") || !validRef(strings.TrimSuffix(p.pushPrefix, "/")) ||
		p.pushPrefix == "refs/" || p.pushPrefix == "refs/heads/" || p.pushPrefix == "refs/tags/" {
		return nil, fmt.Errorf("push_ref_prefix: %q must be a ref namespace below refs/heads/ or refs/tags/, ending in /", p.pushPrefix)
	}
	for _, r := range o.Rules {
		if !r.Deny && r.Methods[http.MethodPost] && (r.Path.match("/scm/x/y/git-receive-pack") || r.Path.match("/scm/x/y.git/git-receive-pack")) {
			return nil, fmt.Errorf("rules: %s would allow git pushes without the ref check; use profile bitbucket-dc-appsec", r.Name)
		}
	}
	if len(o.Repositories) > 0 {
		s, err := newScope(o.Repositories)
		if err != nil {
			return nil, err
		}
		p.scope = s
	}
	return p, nil
}

// PushRefPrefix is where writes through this policy may go.
func (p *Policy) PushRefPrefix() string { return p.pushPrefix }

// ProfileNames lists the built-in profiles.
func ProfileNames() []string {
	names := make([]string, 0, len(profiles))
	for n := range profiles {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Decide checks one request. rawPath is the path relative to the upstream,
// still percent-encoded as it arrived; rawQuery likewise.
func (p *Policy) Decide(method, rawPath, rawQuery string) Decision {
	canon, err := NormalizePath(rawPath)
	if err != nil {
		return Decision{Rule: "normalise", Reason: err.Error(), Status: http.StatusBadRequest}
	}
	q, err := NormalizeQuery(rawQuery)
	if err != nil {
		return Decision{Path: canon, Rule: "normalise", Reason: err.Error(), Status: http.StatusBadRequest}
	}
	if _, ok := q["_method"]; ok {
		return Decision{Path: canon, Rule: "method-override", Reason: "method override (_method) is not allowed", Status: http.StatusBadRequest}
	}
	segs := pathSegments(canon)
	deny := func(rule, reason string) Decision {
		return Decision{Path: canon, Rule: rule, Reason: reason, Status: http.StatusForbidden}
	}
	for i := range neverAllowed {
		if r := &neverAllowed[i]; r.matches(method, segs, q) {
			return deny("never:"+r.Name, "never allowed through ferry ("+r.Name+")")
		}
	}
	var allowedBy string
	var inspect Inspection
	for i := range p.user {
		r := &p.user[i]
		if !r.matches(method, segs, q) {
			continue
		}
		if r.Deny {
			return deny(r.Name, "denied by "+r.Name)
		}
		allowedBy = r.Name
		break
	}
	if allowedBy == "" {
		for i := range p.allow {
			if r := &p.allow[i]; r.matches(method, segs, q) {
				allowedBy, inspect = r.Name, r.Inspect
				break
			}
		}
	}
	if allowedBy == "" {
		return deny("default-deny", fmt.Sprintf("%s %s is not allowed by profile %s or the upstream's rules", method, canon, p.profile))
	}
	if p.scope != nil {
		if reason := p.scope.check(canon); reason != "" {
			return deny("scope", reason)
		}
	}
	return Decision{Allow: true, Path: canon, Rule: allowedBy, Inspect: inspect}
}

// MaxHeaderFields bounds how many header fields a request may carry.
const MaxHeaderFields = 64

// CheckHeaders refuses headers that would let a request act as something
// other than what the policy judged: method overrides, and absurd counts.
// It returns "" when the headers are acceptable.
func CheckHeaders(h http.Header) string {
	for _, k := range []string{"X-Http-Method-Override", "X-Http-Method", "X-Method-Override"} {
		if _, ok := h[k]; ok {
			return "method override header " + k + " is not allowed"
		}
	}
	if len(h) > MaxHeaderFields {
		return fmt.Sprintf("more than %d header fields", MaxHeaderFields)
	}
	return ""
}

// scope limits which repositories are reachable.
type scope struct {
	pats []repoPattern
}

type repoPattern struct{ project, repo string } // lower case globs

func newScope(list []string) (*scope, error) {
	s := &scope{}
	for _, e := range list {
		proj, repo, ok := strings.Cut(e, "/")
		if !ok || proj == "" || repo == "" || strings.Contains(repo, "/") {
			return nil, fmt.Errorf("repositories: %q is not PROJECT/REPO (globs allowed, e.g. \"PROJ/*\")", e)
		}
		rp := repoPattern{strings.ToLower(proj), strings.ToLower(repo)}
		if _, err := path.Match(rp.project, ""); err != nil {
			return nil, fmt.Errorf("repositories: %q: bad pattern", e)
		}
		if _, err := path.Match(rp.repo, ""); err != nil {
			return nil, fmt.Errorf("repositories: %q: bad pattern", e)
		}
		s.pats = append(s.pats, rp)
	}
	return s, nil
}

func (s *scope) allows(project, repo string) bool {
	project, repo = strings.ToLower(project), strings.ToLower(strings.TrimSuffix(repo, ".git"))
	for _, p := range s.pats {
		pm, _ := path.Match(p.project, project)
		rm, _ := path.Match(p.repo, repo)
		if pm && rm {
			return true
		}
	}
	return false
}

// allowsWholeProject reports whether every repository of project is in
// scope, which is what listing the project's repositories reveals.
func (s *scope) allowsWholeProject(project string) bool {
	project = strings.ToLower(project)
	for _, p := range s.pats {
		if pm, _ := path.Match(p.project, project); pm && p.repo == "*" {
			return true
		}
	}
	return false
}

// check returns "" when canon is inside the scope, else why not. Paths
// that name a repository are judged by it; project-wide paths need the
// whole project in scope; anything else is refused unless it is one of the
// few global endpoints that reveal no repository (scope is default-deny).
func (s *scope) check(canon string) string {
	segs := strings.Split(strings.Trim(canon, "/"), "/")
	lower := make([]string, len(segs))
	for i, v := range segs {
		lower[i] = strings.ToLower(v)
	}
	outside := func(p, r string) string {
		return fmt.Sprintf("repository %s/%s is outside this upstream's repositories scope", p, r)
	}
	// Git smart HTTP and LFS: /scm/{project}/{repo}[.git]/...
	if len(lower) >= 3 && lower[0] == "scm" {
		if s.allows(segs[1], segs[2]) {
			return ""
		}
		return outside(segs[1], segs[2])
	}
	if len(lower) < 2 || lower[0] != "rest" {
		return "path is not attributable to a repository in this upstream's repositories scope"
	}
	// LFS objects: /rest/git-lfs/storage/{PROJECT}/{repo}/{oid}
	if len(lower) >= 5 && lower[1] == "git-lfs" && lower[2] == "storage" {
		if s.allows(segs[3], segs[4]) {
			return ""
		}
		return outside(segs[3], segs[4])
	}
	// REST: /rest/{api}/{version}/.../projects/{P}[/repos/{R}/...]
	for i := 1; i+1 < len(lower); i++ {
		if lower[i] != "projects" {
			continue
		}
		project := segs[i+1]
		switch {
		case i+3 < len(lower) && lower[i+2] == "repos":
			if s.allows(project, segs[i+3]) {
				return ""
			}
			return outside(project, segs[i+3])
		case s.allowsWholeProject(project):
			return ""
		default:
			return fmt.Sprintf("project %s is only partly in this upstream's repositories scope; project-wide endpoints would reveal other repositories", project)
		}
	}
	if len(lower) >= 4 && lower[1] == "api" && globalEndpoints[lower[3]] {
		return ""
	}
	return "this endpoint is not tied to one repository, so it could reach repositories outside this upstream's repositories scope"
}

// globalEndpoints are /rest/api/{version}/{name}/... endpoints that reveal
// no repository: instance properties and the user directory.
var globalEndpoints = map[string]bool{
	"application-properties": true,
	"users":                  true,
	"groups":                 true,
	"admin":                  true, // reads only: writes are never allowed
}
