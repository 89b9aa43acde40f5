// Package registry records which relay replica holds agent connections
// for which tunnel, so that a scanner request landing on any replica can
// be forwarded to one that has the agent.
//
// Memory is the single-replica default and records nothing. Redis keeps,
// per tunnel, a sorted set of replica advertise URLs scored by the time
// the entry expires; replicas refresh their entries by heartbeat, remove
// them when their last connection for a tunnel ends and on clean
// shutdown, and entries of a replica that died expire by themselves.
package registry

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
)

// Registry is what the relay needs from a registry.
type Registry interface {
	// Hold records that this replica now has agent connections for tunnel.
	Hold(tunnel string)
	// Release records that it has none any more.
	Release(tunnel string)
	// Owners lists the advertise URLs of other replicas holding tunnel.
	Owners(ctx context.Context, tunnel string) ([]string, error)
	// Replicas counts live replicas, this one included.
	Replicas(ctx context.Context) (int, error)
	// Problem is "" while the registry works, else what is wrong.
	Problem() string
}

// Memory is the one-replica registry: nothing to share.
type Memory struct{}

func (Memory) Hold(string)                                      {}
func (Memory) Release(string)                                   {}
func (Memory) Owners(context.Context, string) ([]string, error) { return nil, nil }
func (Memory) Replicas(context.Context) (int, error)            { return 1, nil }
func (Memory) Problem() string                                  { return "" }

const (
	prefix        = "ferry:"
	replicasKey   = prefix + "replicas"
	peerSecretKey = prefix + "peer-secret"
	opTimeout     = 2 * time.Second
	defaultTTL    = 15 * time.Second
)

func tunnelKey(id string) string { return prefix + "tunnel:" + id }

// go-redis logs connection failures itself, in its own format, through a
// process-wide logger; the registry reports them (once per change, with
// slog) instead.
var quietRedis sync.Once

type discard struct{}

func (discard) Printf(context.Context, string, ...any) {}

// Redis is the shared registry of a scaled-out relay.
type Redis struct {
	c    *redis.Client
	self string // this replica's advertise URL
	ttl  time.Duration
	log  *slog.Logger

	mu       sync.Mutex
	held     map[string]bool
	released map[string]bool // to remove from Redis at the next sync
	kick     chan struct{}   // asks Run to sync now
	problem  atomic.Pointer[string]
	// OnChange, if set, is called with the new Problem() when the
	// registry goes from working to failing or back.
	OnChange func(problem string)

	// Entries expire by Redis's clock, not each replica's: a replica
	// whose clock is off by more than the ttl would otherwise find every
	// other replica's entries expired (and forward nothing), or keep a
	// dead one's. skew is Redis's time minus ours, in nanoseconds, taken
	// at every sync; clock is time.Now (tests move it).
	skew       atomic.Int64
	skewWarned bool // owned by sync
	clock      func() time.Time
}

// maxQuietSkew: a larger difference between this replica's clock and
// Redis's is logged (once), as other things on the host may suffer too.
const maxQuietSkew = 5 * time.Second

// now is the time by Redis's clock, as last measured.
func (r *Redis) now() time.Time { return r.clock().Add(time.Duration(r.skew.Load())) }

// NewRedis connects lazily to url (redis://[user:pass@]host:port/db); self
// is this replica's advertise URL.
func NewRedis(url, self string, log *slog.Logger) (*Redis, error) {
	quietRedis.Do(func() { redis.SetLogger(discard{}) })
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("registry.redis_url: %w", err)
	}
	opt.DialTimeout, opt.ReadTimeout, opt.WriteTimeout = opTimeout, opTimeout, opTimeout
	opt.MaxRetries = 1
	opt.PoolSize = 16
	r := &Redis{c: redis.NewClient(opt), self: self, ttl: defaultTTL, log: log, held: map[string]bool{}, released: map[string]bool{}, kick: make(chan struct{}, 1),
		clock: time.Now}
	p := "not contacted yet"
	r.problem.Store(&p)
	return r, nil
}

// Problem is "" while the last Redis operation worked.
func (r *Redis) Problem() string { return *r.problem.Load() }

func (r *Redis) note(err error) {
	p := ""
	if err != nil {
		p = "redis: " + err.Error()
	}
	old := r.problem.Swap(&p)
	if (*old == "") == (p == "") {
		return
	}
	if p != "" {
		r.log.Warn("registry unavailable: serving only tunnels held here; requests for others get 503 tunnel_offline", "err", err)
	} else {
		r.log.Info("registry reachable again")
	}
	if r.OnChange != nil {
		r.OnChange(p)
	}
}

// Hold records that this replica holds tunnel. It does not wait for
// Redis (agent connections must not stall on it): Run writes it at once.
func (r *Redis) Hold(tunnel string) {
	r.mu.Lock()
	r.held[tunnel] = true
	delete(r.released, tunnel)
	r.mu.Unlock()
	r.wake()
}

// Release records that this replica no longer holds tunnel; Run removes
// it from Redis at once, so other replicas stop forwarding here.
func (r *Redis) Release(tunnel string) {
	r.mu.Lock()
	delete(r.held, tunnel)
	r.released[tunnel] = true
	r.mu.Unlock()
	r.wake()
}

func (r *Redis) wake() {
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// Owners lists other live replicas holding tunnel.
func (r *Redis) Owners(ctx context.Context, tunnel string) ([]string, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	now := strconv.FormatInt(r.now().UnixMilli(), 10)
	urls, err := r.c.ZRangeArgs(ctx, redis.ZRangeArgs{Key: tunnelKey(tunnel), ByScore: true, Start: "(" + now, Stop: "+inf"}).Result()
	r.note(err)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(urls, func(u string) bool { return u == r.self }), nil
}

// Replicas counts replicas whose heartbeat is current.
func (r *Redis) Replicas(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	now := strconv.FormatInt(r.now().UnixMilli(), 10)
	n, err := r.c.ZCount(ctx, replicasKey, "("+now, "+inf").Result()
	r.note(err)
	return int(n), err
}

// sync writes the held tunnels (and this replica's heartbeat) and removes
// the released ones. Releases that fail are retried at the next sync.
func (r *Redis) sync(ctx context.Context) error {
	r.mu.Lock()
	held := slices.Collect(maps.Keys(r.held))
	released := slices.Collect(maps.Keys(r.released))
	clear(r.released)
	r.mu.Unlock()

	if err := r.measureSkew(ctx); err != nil {
		return err
	}
	until := float64(r.now().Add(r.ttl).UnixMilli())
	now := strconv.FormatInt(r.now().UnixMilli(), 10)
	_, err := r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, t := range released {
			p.ZRem(ctx, tunnelKey(t), r.self)
		}
		p.ZAdd(ctx, replicasKey, redis.Z{Score: until, Member: r.self})
		p.ZRemRangeByScore(ctx, replicasKey, "-inf", now)
		p.Expire(ctx, replicasKey, 10*r.ttl)
		for _, t := range held {
			k := tunnelKey(t)
			p.ZAdd(ctx, k, redis.Z{Score: until, Member: r.self})
			p.ZRemRangeByScore(ctx, k, "-inf", now) // entries of replicas that died
			p.Expire(ctx, k, 10*r.ttl)
		}
		return nil
	})
	if err != nil {
		r.mu.Lock()
		for _, t := range released {
			if !r.held[t] {
				r.released[t] = true
			}
		}
		r.mu.Unlock()
	}
	return err
}

// measureSkew asks Redis for its time and keeps the difference from ours
// (taken at the middle of the round trip).
func (r *Redis) measureSkew(ctx context.Context) error {
	sent := r.clock()
	theirs, err := r.c.Time(ctx).Result()
	if rerr := redis.Error(nil); errors.As(err, &rerr) {
		// TIME refused (a server that renamed or disabled it): go on by
		// this host's clock rather than count Redis as down.
		if !r.skewWarned {
			r.skewWarned = true
			r.log.Warn("redis refused TIME; the registry goes by this host's clock (keep the replicas' clocks in step)", "err", err)
		}
		return nil
	}
	if err != nil {
		return err
	}
	mid := sent.Add(r.clock().Sub(sent) / 2)
	skew := theirs.Sub(mid)
	r.skew.Store(int64(skew))
	if large := skew > maxQuietSkew || skew < -maxQuietSkew; large && !r.skewWarned {
		r.skewWarned = true
		r.log.Warn("this host's clock differs from redis's; the registry uses redis's time (check NTP on this host)", "redis_minus_local", skew.Round(time.Millisecond).String())
	} else if !large {
		r.skewWarned = false
	}
	return nil
}

// Run keeps Redis in step with this replica until ctx ends: at once after
// each Hold or Release, and every ttl/3 as a heartbeat.
func (r *Redis) Run(ctx context.Context) {
	tick := time.NewTicker(r.ttl / 3)
	defer tick.Stop()
	for {
		sctx, cancel := context.WithTimeout(ctx, opTimeout)
		r.note(r.sync(sctx))
		cancel()
		select {
		case <-tick.C:
		case <-r.kick:
		case <-ctx.Done():
			return
		}
	}
}

// Close removes this replica's entries and closes the client.
func (r *Redis) Close() error {
	r.mu.Lock()
	tunnels := slices.Collect(maps.Keys(r.held))
	clear(r.held)
	r.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), opTimeout)
	defer cancel()
	_, err := r.c.Pipelined(ctx, func(p redis.Pipeliner) error {
		p.ZRem(ctx, replicasKey, r.self)
		for _, t := range tunnels {
			p.ZRem(ctx, tunnelKey(t), r.self)
		}
		return nil
	})
	if err != nil {
		r.log.Warn("could not remove this replica from the registry; its entries expire in "+r.ttl.String(), "err", err)
	}
	return errors.Join(err, r.c.Close())
}

// PeerSecret returns the secret replicas authenticate to each other with
// when no peer_secret_file is set: created once in Redis by whichever
// replica comes first, read by the others. have is the secret this
// replica already uses ("" at start): if Redis lost it (restarted without
// persistence, flushed), have is put back rather than a new one made, so
// that the replicas running keep agreeing; if Redis holds another, that
// one is returned, and the caller adopts it.
func (r *Redis) PeerSecret(ctx context.Context, have string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, opTimeout)
	defer cancel()
	if have == "" {
		var b [32]byte
		rand.Read(b[:])
		have = hex.EncodeToString(b[:])
	}
	if err := r.c.SetNX(ctx, peerSecretKey, have, 0).Err(); err != nil {
		r.note(err)
		return "", fmt.Errorf("create peer secret in redis: %w", err)
	}
	s, err := r.c.Get(ctx, peerSecretKey).Result()
	r.note(err)
	if err != nil {
		return "", fmt.Errorf("read peer secret from redis: %w", err)
	}
	return s, nil
}
