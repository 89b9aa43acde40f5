#!/bin/sh
# Make systemd see the unit; do not start it: the config and credentials
# need filling in first (README, "Run the agent under systemd").
set -e
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload >/dev/null 2>&1 || true
fi
echo "ferry-agent installed: edit /etc/ferry/agent.yaml, put the relay token in /etc/ferry/relay-token"
echo "and the Bitbucket token in /etc/ferry/bitbucket-pat, run 'ferry-agent doctor --config /etc/ferry/agent.yaml',"
echo "then 'systemctl enable --now ferry-agent'."
