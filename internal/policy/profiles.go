package policy

import "strings"

// The built-in profiles, modelled on Bitbucket Data Center 8+'s REST API
// and git smart HTTP. The README documents them as a table; keep both in
// step. Families name the rule in decisions and audit lines.

// mustRule builds a built-in rule; a typo here is a programming error.
func mustRule(family, methods, pat string, query ...string) Rule {
	r, err := CompileRule(family, RuleSpec{Methods: strings.Split(methods, ","), Path: pat})
	if err != nil {
		panic("policy: built-in rule " + family + ": " + err.Error())
	}
	if len(query) > 0 {
		r.Query = map[string]string{}
		for i := 0; i+1 < len(query); i += 2 {
			r.Query[query[i]] = query[i+1]
		}
	}
	return r
}

const restAPI = "/rest/api/{1.0,latest}"

// readRules is what bitbucket-dc-read allows.
var readRules = []Rule{
	mustRule("rest-read", "GET,HEAD", restAPI+"/application-properties"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*/repos"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*/repos/*"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/projects/*/repos/*/{branches,tags,commits,browse,raw,files,pull-requests,compare,diff,last-modified,default-branch,archive}/**"),
	mustRule("rest-read", "GET,HEAD", restAPI+"/repos"),
	mustRule("git-read", "GET,HEAD", "/scm/*/*/info/refs", "service", "git-upload-pack"),
	mustRule("git-read", "POST", "/scm/*/*/git-upload-pack"),
}

var profiles = map[string][]Rule{
	"bitbucket-dc-read": readRules,
}

// neverAllowed holds what no profile and no user rule can open.
var neverAllowed = []Rule{
	mustRule("admin", "POST,PUT,PATCH,DELETE", "/rest/api/*/admin/**"),
	mustRule("plugins", "GET,HEAD,POST,PUT,PATCH,DELETE,OPTIONS", "/plugins/servlet/**"),
	mustRule("permissions", "POST,PUT,PATCH,DELETE", "/rest/api/*/**/permissions/**"),
	mustRule("user-admin", "POST,PUT,PATCH,DELETE", "/rest/api/*/users/**"),
	mustRule("repo-delete", "DELETE", "/rest/api/*/projects/*/repos/*"),
	mustRule("project-delete", "DELETE", "/rest/api/*/projects/*"),
}
