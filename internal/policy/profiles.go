package policy

import "strings"

// The built-in profiles, modelled on Bitbucket Data Center 8+'s REST API,
// git smart HTTP and Git LFS. The README documents them as a table; keep
// both in step. Families name the rule in decisions and audit lines.

// mustRule builds a built-in rule; a typo here is a programming error.
func mustRule(family, methods, pat string, opts ...ruleOpt) Rule {
	r, err := CompileRule(family, RuleSpec{Methods: strings.Split(methods, ","), Path: pat})
	if err != nil {
		panic("policy: built-in rule " + family + ": " + err.Error())
	}
	for _, o := range opts {
		o(&r)
	}
	return r
}

type ruleOpt func(*Rule)

// query requires key to appear exactly once with value.
func query(key, value string) ruleOpt {
	return func(r *Rule) {
		if r.Query == nil {
			r.Query = map[string]string{}
		}
		r.Query[key] = value
	}
}

// inspect makes the rule's allowance depend on the request body.
func inspect(i Inspection) ruleOpt { return func(r *Rule) { r.Inspect = i } }

const (
	restAPI  = "/rest/api/{1.0,latest}"
	repo     = restAPI + "/projects/*/repos/*"
	insights = "/rest/insights/{1.0,latest}/projects/*/repos/*/commits/*/reports"
)

// readRules is bitbucket-dc-read: REST reads, git clone and fetch, LFS
// download.
var readRules = []Rule{
	mustRule("rest-read", "GET,HEAD", restAPI+"/application-properties"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*/repos"),
	mustRule("rest-read", "GET,HEAD", repo),
	mustRule("rest-read", "GET,HEAD", repo+"/{branches,tags,commits,browse,raw,files,pull-requests,compare,diff,last-modified,default-branch,archive}/**"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/repos"),
	mustRule("git-read", "GET,HEAD", "/scm/*/*/info/refs", query("service", "git-upload-pack")),
	mustRule("git-read", "POST", "/scm/*/*/git-upload-pack"),
	mustRule("lfs-download", "POST", "/scm/*/*/info/lfs/objects/batch", inspect(InspectLFSBatch)),
	mustRule("lfs-download", "GET,HEAD", "/rest/git-lfs/storage/*/*/*"),
}

// appsecRules is bitbucket-dc-appsec: read, plus what a security scanner
// writes back. Branch writes are confined to the push ref prefix.
var appsecRules = append(append([]Rule(nil), readRules...),
	mustRule("webhooks", "GET,POST", repo+"/webhooks"),
	mustRule("webhooks", "GET,PUT,DELETE", repo+"/webhooks/*"),
	mustRule("webhooks", "GET", repo+"/webhooks/*/**"),
	mustRule("webhooks", "POST", repo+"/webhooks/test"),
	mustRule("pull-request-write", "POST", repo+"/pull-requests"),
	mustRule("pull-request-write", "POST", repo+"/pull-requests/*/{comments,blocker-comments}"),
	mustRule("pull-request-write", "PUT,DELETE", repo+"/pull-requests/*/{comments,blocker-comments}/*"),
	mustRule("build-status", "GET,POST", "/rest/build-status/{1.0,latest}/commits/*"),
	mustRule("build-status", "GET,POST", repo+"/commits/*/builds"),
	mustRule("code-insights", "GET", insights),
	mustRule("code-insights", "GET,PUT,DELETE", insights+"/*"),
	mustRule("code-insights", "GET,POST,DELETE", insights+"/*/annotations"),
	mustRule("code-insights", "PUT,DELETE", insights+"/*/annotations/*"),
	mustRule("code-insights", "GET", "/rest/insights/{1.0,latest}/projects/*/repos/*/commits/*/annotations"),
	mustRule("branch-create", "POST", "/rest/branch-utils/{1.0,latest}/projects/*/repos/*/branches", inspect(InspectBranchCreate)),
	mustRule("branch-create", "POST", repo+"/branches", inspect(InspectBranchCreate)),
	mustRule("file-edit", "PUT", repo+"/browse/**", inspect(InspectFileEdit)),
	mustRule("git-push", "GET,HEAD", "/scm/*/*/info/refs", query("service", "git-receive-pack")),
	mustRule("git-push", "POST", "/scm/*/*/git-receive-pack", inspect(InspectReceivePack)),
)

// accessReviewRules is bitbucket-dc-access-review: who can do what, for
// identity governance. No code, no git.
var accessReviewRules = []Rule{
	mustRule("directory-read", "GET,HEAD", restAPI+"/{users,groups}"),
	mustRule("directory-read", "GET,HEAD", restAPI+"/users/*"),
	mustRule("directory-read", "GET,HEAD", restAPI+"/admin/{users,groups}"),
	mustRule("directory-read", "GET,HEAD", restAPI+"/admin/{users,groups}/more-members"),
	mustRule("directory-read", "GET,HEAD", restAPI+"/admin/{users,groups}/more-non-members"),
	mustRule("permission-read", "GET,HEAD", restAPI+"/admin/permissions/{users,groups}"),
	mustRule("permission-read", "GET,HEAD", restAPI+"/projects/*/permissions/{users,groups}"),
	mustRule("permission-read", "GET,HEAD", repo+"/permissions/{users,groups}"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/application-properties"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*/repos"),
	mustRule("rest-read", "GET,HEAD", repo),
}

var profiles = map[string][]Rule{
	"bitbucket-dc-read":          readRules,
	"bitbucket-dc-appsec":        appsecRules,
	"bitbucket-dc-access-review": accessReviewRules,
}

// neverAllowed holds what no profile and no user rule can open.
var neverAllowed = []Rule{
	mustRule("admin", "POST,PUT,PATCH,DELETE", "/rest/api/*/admin/**"),
	mustRule("admin", "GET,HEAD,POST,PUT,PATCH,DELETE,OPTIONS", "/admin/**"),
	mustRule("plugins", "GET,HEAD,POST,PUT,PATCH,DELETE,OPTIONS", "/plugins/servlet/**"),
	mustRule("plugins", "POST,PUT,PATCH,DELETE", "/rest/plugins/**"),
	mustRule("permissions", "POST,PUT,PATCH,DELETE", "/rest/**/permissions/**"),
	mustRule("user-admin", "POST,PUT,PATCH,DELETE", "/rest/api/*/users/**"),
	mustRule("user-admin", "POST,PUT,PATCH,DELETE", "/rest/api/*/groups/**"),
	mustRule("repo-delete", "DELETE", restAPI+"/projects/*/repos/*"),
	mustRule("project-delete", "DELETE", restAPI+"/projects/*"),
	mustRule("repo-settings", "POST,PUT,PATCH,DELETE", repo+"/settings/**"),
	mustRule("project-settings", "POST,PUT,PATCH,DELETE", restAPI+"/projects/*/settings/**"),
}
