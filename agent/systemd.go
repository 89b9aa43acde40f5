package agent

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// readyAfter bounds how long READY=1 waits for the first relay connection,
// so a relay outage at boot does not fail the unit (the agent keeps
// retrying and says so in STATUS=).
const readyAfter = 20 * time.Second

// notifySystemd speaks sd_notify when run under systemd (Type=notify);
// without NOTIFY_SOCKET it returns at once. It sends READY=1 once the
// first relay connection is up (or after readyAfter), keeps STATUS=
// current, and feeds the watchdog at half its interval, but only while
// the agent's own /healthz answers: a wedged agent is restarted.
func (a *Agent) notifySystemd(ctx context.Context) {
	if sent, err := daemon.SdNotify(false, "STATUS=starting"); !sent || err != nil {
		return
	}
	interval, _ := daemon.SdWatchdogEnabled(false)
	tick := time.Second
	if interval > 0 && interval/2 < tick {
		tick = interval / 2
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	client := &http.Client{Timeout: 2 * time.Second}
	defer client.CloseIdleConnections()
	start, ready := time.Now(), false
	lastWatchdog := time.Time{}
	for {
		n := a.Connected()
		if !ready && (n > 0 || time.Since(start) > readyAfter) {
			daemon.SdNotify(false, daemon.SdNotifyReady)
			ready = true
		}
		status := fmt.Sprintf("STATUS=%d of %d relay connections up", n, len(a.slots.all()))
		if n == 0 {
			status += "; reconnecting (ferry-agent status for the last error)"
		}
		daemon.SdNotify(false, status)
		if interval > 0 && time.Since(lastWatchdog) >= interval/2 && a.healthy(ctx, client) {
			daemon.SdNotify(false, daemon.SdNotifyWatchdog)
			lastWatchdog = time.Now()
		}
		select {
		case <-ctx.Done():
			daemon.SdNotify(false, daemon.SdNotifyStopping)
			return
		case <-t.C:
		}
	}
}

// healthy asks the agent's own diagnostics listener, which proves the
// process still serves HTTP.
func (a *Agent) healthy(ctx context.Context, client *http.Client) bool {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.DiagAddr()+"/healthz", nil)
	if err != nil {
		return false
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}
