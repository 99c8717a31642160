#!/usr/bin/env bash
# Each layer speaks its own vocabulary (see README, "Design"): the CRI's wire types only in the
# CRI layer, the agent protocol only behind the agent boundary (and in the agent itself).
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
# Rust sources of the workspace, as paths relative to the repository.
sources() { git ls-files --cached --others --exclude-standard -- '*.rs'; }

cri_outside=$(sources | grep '^runtime/' | grep -v '^runtime/src/cri/' \
	| xargs -r grep -lE '\bk8s_cri\b' || true)
if [ -n "$cri_outside" ]; then
	echo "k8s_cri (CRI wire types) used outside runtime/src/cri/:" >&2
	echo "$cri_outside" | sed 's/^/  /' >&2
	status=1
fi

proto_outside=$(sources | grep -vE '^(runtime/src/agent/|guest-agent/|proto/)' \
	| xargs -r grep -lE '\bpodvisor_proto\b' || true)
if [ -n "$proto_outside" ]; then
	echo "podvisor_proto (the agent protocol) used outside runtime/src/agent/ and guest-agent/:" >&2
	echo "$proto_outside" | sed 's/^/  /' >&2
	status=1
fi
[ "$status" -eq 0 ] && echo "layers: ok"
exit "$status"
