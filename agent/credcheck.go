package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"time"
)

// CredentialReport is what the upstream said about the agent's credential.
type CredentialReport struct {
	Upstream string    `json:"upstream"`
	Checked  time.Time `json:"checked"`
	Valid    bool      `json:"valid"`
	User     string    `json:"user,omitempty"`
	Expiry   time.Time `json:"expiry,omitempty"` // zero: not reported
	Problem  string    `json:"problem,omitempty"`
}

// checkCredential asks the upstream who the credential is. Bitbucket
// answers anonymous reads with 200 when public access is on, so the
// status says little: the X-AUSERNAME header names the authenticated
// user, and its absence means the credential was not accepted. The
// expiry comes, where Bitbucket reports it, from the user's token list
// (the token most recently used is taken to be this one).
func (u *upstream) checkCredential(ctx context.Context) (CredentialReport, error) {
	rep := CredentialReport{Upstream: u.cfg.Name, Checked: time.Now()}
	auth, err := u.authHeader()
	if err != nil {
		rep.Problem = err.Error()
		return rep, nil
	}
	resp, err := u.get(ctx, "/rest/api/1.0/application-properties", auth)
	if err != nil {
		return rep, err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<16))
	resp.Body.Close()
	rep.User = resp.Header.Get("X-AUSERNAME")
	switch {
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden:
		rep.Problem = fmt.Sprintf("%s answered %d: the credential is not accepted (wrong, revoked or expired)", u.cfg.Name, resp.StatusCode)
		return rep, nil
	case resp.StatusCode >= 400:
		rep.Problem = fmt.Sprintf("%s answered %d to the credential check", u.cfg.Name, resp.StatusCode)
		return rep, nil
	case rep.User == "":
		rep.Problem = fmt.Sprintf("%s answered anonymously (no X-AUSERNAME): the credential was ignored, so it is wrong or expired and public access is on", u.cfg.Name)
		return rep, nil
	}
	rep.Valid = true
	rep.Expiry = u.tokenExpiry(ctx, auth, rep.User)
	return rep, nil
}

func (u *upstream) get(ctx context.Context, path, auth string) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.cfg.URL+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", auth)
	req.Header.Set("Accept", "application/json")
	return u.transport.RoundTrip(req)
}

// tokenExpiry reads /rest/access-tokens/1.0/users/{user}; zero when the
// upstream does not say (not Bitbucket, no permission, no expiry set).
func (u *upstream) tokenExpiry(ctx context.Context, auth, user string) time.Time {
	resp, err := u.get(ctx, "/rest/access-tokens/1.0/users/"+url.PathEscape(user)+"?limit=100", auth)
	if err != nil {
		return time.Time{}
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return time.Time{}
	}
	var page struct {
		Values []struct {
			CreatedDate       int64 `json:"createdDate"`
			LastAuthenticated int64 `json:"lastAuthenticated"`
			ExpiryDays        int   `json:"expiryDays"`
		} `json:"values"`
	}
	if json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&page) != nil {
		return time.Time{}
	}
	var best int64 = -1
	var expiry time.Time
	for _, v := range page.Values {
		if v.LastAuthenticated > best {
			best = v.LastAuthenticated
			expiry = time.Time{}
			if v.ExpiryDays > 0 {
				expiry = time.UnixMilli(v.CreatedDate).Add(time.Duration(v.ExpiryDays) * 24 * time.Hour)
			}
		}
	}
	return expiry
}

// recordCredential keeps a check's result for status and metrics, unless
// a reload removed or replaced u while it was checked (the replacement is
// checked after the reload). Under credMu, so that forgetCredentials,
// which runs after the reload's swap, cannot be overtaken by it.
func (a *Agent) recordCredential(u *upstream, rep CredentialReport) bool {
	a.credMu.Lock()
	defer a.credMu.Unlock()
	name := u.cfg.Name
	if a.upstreams().byName[name] != u {
		return false
	}
	a.creds[name] = rep
	valid := 0.0
	if rep.Valid {
		valid = 1
	}
	a.metrics.CredentialValid.WithLabelValues(name).Set(valid)
	if rep.Expiry.IsZero() {
		// A credential rotated to one that does not expire must not keep
		// the old one's expiry (and its alert).
		a.metrics.CredentialExpiry.DeleteLabelValues(name)
	} else {
		a.metrics.CredentialExpiry.WithLabelValues(name).Set(float64(rep.Expiry.Unix()))
	}
	return true
}

// forgetCredentials drops what is known of the credentials of upstreams
// a reload removed: their series would stay at their last value, and an
// alert on a rejected or expiring credential fire for good.
func (a *Agent) forgetCredentials(names []string) {
	a.credMu.Lock()
	defer a.credMu.Unlock()
	for _, name := range names {
		delete(a.creds, name)
		a.metrics.CredentialValid.DeleteLabelValues(name)
		a.metrics.CredentialExpiry.DeleteLabelValues(name)
	}
}

// credentialCheckEvery is how often the running agent re-checks.
const credentialCheckEvery = 10 * time.Minute

// watchCredentials checks every upstream's credential now and then every
// credentialCheckEvery, keeping metrics and status current and warning
// well before an expiry. It returns when ctx ends.
func (a *Agent) watchCredentials(ctx context.Context) {
	t := time.NewTicker(credentialCheckEvery)
	defer t.Stop()
	for {
		ups := a.upstreams()
		for _, name := range ups.names {
			a.checkOneCredential(ctx, ups.byName[name])
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.recheck:
		}
	}
}

func (a *Agent) checkOneCredential(ctx context.Context, u *upstream) {
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	rep, err := u.checkCredential(cctx)
	if err != nil {
		if ctx.Err() == nil {
			a.log.Warn("credential check could not reach the upstream", "upstream", u.cfg.Name, "err", err)
		}
		return
	}
	if !a.recordCredential(u, rep) {
		a.closeIdleIfReplaced(u)
		return // a reload removed or replaced the upstream meanwhile
	}
	switch {
	case !rep.Valid:
		a.log.Error("upstream credential not accepted", "upstream", u.cfg.Name, "problem", rep.Problem)
	case !rep.Expiry.IsZero() && time.Until(rep.Expiry) < 14*24*time.Hour:
		a.log.Warn("upstream credential expires soon", "upstream", u.cfg.Name, "user", rep.User, "expiry", rep.Expiry.Format(time.RFC3339))
	default:
		a.log.Info("upstream credential accepted", "upstream", u.cfg.Name, "user", rep.User, "expiry", rep.Expiry)
	}
}
