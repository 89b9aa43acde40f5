package testrig

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// GitEnv is a fixed identity and no user or system config, so git behaves
// the same on every machine.
func GitEnv() []string {
	return append(os.Environ(),
		"GIT_AUTHOR_NAME=ferry test", "GIT_AUTHOR_EMAIL=test@ferry.invalid",
		"GIT_COMMITTER_NAME=ferry test", "GIT_COMMITTER_EMAIL=test@ferry.invalid",
		"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=/dev/null", "GIT_TERMINAL_PROMPT=0",
	)
}

// Git runs git in dir and returns its output, or an error with stderr.
func Git(dir string, args ...string) (string, error) {
	cmd := exec.Command("git", args...)
	cmd.Dir = dir
	cmd.Env = GitEnv()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("git %s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(errb.String()))
	}
	return out.String(), nil
}

// MakeRepo creates a bare repository root/{project}/{slug}.git (project
// lower-cased, as Bitbucket's clone URLs have it) with `commits` commits on
// main, each changing README.md and adding a file, and a tag v1 on the
// first commit. It returns the path of the bare repository.
func MakeRepo(root, project, slug string, commits int) (string, error) {
	bare := filepath.Join(root, strings.ToLower(project), slug+".git")
	work, err := os.MkdirTemp("", "ferry-repo-")
	if err != nil {
		return "", err
	}
	defer os.RemoveAll(work)
	steps := [][]string{{"init", "-q", "-b", "main"}}
	if _, err := Git(work, steps[0]...); err != nil {
		return "", err
	}
	for i := 1; i <= commits; i++ {
		readme := fmt.Sprintf("# %s/%s\n\nrevision %d\n", project, slug, i)
		if err := os.WriteFile(filepath.Join(work, "README.md"), []byte(readme), 0o644); err != nil {
			return "", err
		}
		src := fmt.Sprintf("package main\n\n// step %d\nfunc main() {}\n", i)
		if err := os.WriteFile(filepath.Join(work, fmt.Sprintf("step%03d.go", i)), []byte(src), 0o644); err != nil {
			return "", err
		}
		if _, err := Git(work, "add", "-A"); err != nil {
			return "", err
		}
		if _, err := Git(work, "commit", "-q", "-m", fmt.Sprintf("step %d", i)); err != nil {
			return "", err
		}
		if i == 1 {
			if _, err := Git(work, "tag", "v1"); err != nil {
				return "", err
			}
		}
	}
	if err := os.MkdirAll(filepath.Dir(bare), 0o755); err != nil {
		return "", err
	}
	if _, err := Git(work, "clone", "-q", "--bare", work, bare); err != nil {
		return "", err
	}
	if _, err := Git(bare, "config", "http.receivepack", "true"); err != nil {
		return "", err
	}
	return bare, nil
}
