module github.com/ferry-tunnel/ferry

go 1.26.8

require (
	github.com/hashicorp/yamux v0.1.2
	go.uber.org/goleak v1.3.0
	gopkg.in/yaml.v3 v3.0.1
)

require (
	github.com/coder/websocket v1.8.15 // indirect
	github.com/kr/text v0.2.0 // indirect
)
