# ferry — see README.md. `make demo` and `make test` are the two commands a
# newcomer runs; `make deps` installs what they need on Debian/Ubuntu.

GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X github.com/ferry-tunnel/ferry/internal/version.Version=$(VERSION)
FUZZTIME  ?= 30s
SOAK      ?= 10m
STATICCHECK_VERSION ?= v0.8.2

.PHONY: all build test demo bench soak deps fuzz lint deb clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/ ./cmd/ferry-agent ./cmd/ferry-relay

# Every test, with the race detector; fuzz targets run their seed corpus.
test: deps
	$(GO) test -race -count=1 -timeout 12m ./...

# A complete local setup: Bitbucket stand-in, relay, agent, git clone.
demo: deps build
	$(GO) run ./demo -bin bin

# ferry side by side with a direct connection; table + bench/results.json.
bench: deps build
	$(GO) run ./bench -bin bin -out bench/results.json

# Mixed traffic for SOAK between two quiet spells: do the daemons come
# back to the goroutines, open files and live heap they had before?
soak: deps build
	$(GO) run ./bench -bin bin -only soak -soak $(SOAK)

# Longer fuzzing of every decoder and the path normaliser.
fuzz:
	GO=$(GO) scripts/fuzz.sh $(FUZZTIME)

lint:
	@test -z "$$(gofmt -l .)" || { echo "gofmt would change:"; gofmt -l .; exit 1; }
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...

# Tools the tests and demo drive for real. Installs only what is missing.
deps:
	@missing=""; \
	command -v git >/dev/null || missing="$$missing git"; \
	command -v gcc >/dev/null || missing="$$missing gcc libc6-dev"; \
	command -v git-lfs >/dev/null || missing="$$missing git-lfs"; \
	command -v tinyproxy >/dev/null || missing="$$missing tinyproxy"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v ss >/dev/null || missing="$$missing iproute2"; \
	command -v prlimit >/dev/null || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@$(GO) mod download

# Debian package of the agent (binary, systemd unit, example config).
deb: build
	FERRY_VERSION=$$(case "$(VERSION)" in v[0-9]*) echo "$(VERSION)" | sed 's/^v//';; *) echo "0.0.0~git$(VERSION)" | tr -d -;; esac) $(GO) run github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.44.0 pkg --config deploy/nfpm.yaml --packager deb --target bin/

clean:
	rm -rf bin
