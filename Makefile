# Podvisor: `make run` and `make test` do everything on a fresh Debian 12 machine.
SHELL := /bin/bash
BUILD := $(CURDIR)/build
export PATH := $(HOME)/.cargo/bin:/usr/local/bin:$(PATH)
# Slow artefacts (the guest kernel) are cached here, keyed by their inputs.
export PODVISOR_CACHE ?= /var/cache/podvisor
# The agent is built into its own target dir: it is static (crt-static) and release-only.
AGENT_TARGET_DIR ?= $(CURDIR)/target/agent

APT_PACKAGES := qemu-system-x86 linux-source-6.1 flex bison bc libelf-dev libssl-dev \
	erofs-utils docker-registry skopeo umoci busybox-static containernetworking-plugins \
	libseccomp-dev libcap-ng-dev protobuf-compiler cpio iproute2 pkg-config apache2-utils \
	build-essential kmod ca-certificates binutils openssl python3 python3-venv iptables
VHOST_DEVICE_VSOCK_VERSION := 0.3.0
VIRTIOFSD_VERSION := 1.14.0
# The e2e tests drive the streaming server with PyPI's kubernetes client too (a WebSocket
# client this project did not write), from a venv of its own.
KUBERNETES_PY_VERSION := 37.0.2
PY_VENV := $(PODVISOR_CACHE)/venv

# cargo-fuzz targets (fuzz/): `make fuzz-smoke` runs each briefly (part of `make test`),
# `make fuzz FUZZ_SECONDS=3600` for long runs. Seeds are in fuzz/corpus/<target> (in-tree,
# read-only); what a run finds goes to target/fuzz/corpus/<target>, crashes to fuzz/artifacts/.
FUZZ_TARGETS := virtqueue_block virtqueue_net virtqueue_vsock vsock_muxer layer_unpack \
	image_import image_reference cri_log_writer fuse_requests cri_request agent_request
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 20
CARGO_FUZZ_VERSION := 0.13.2

.PHONY: all deps kernel guest build build-debug run test lint unit e2e bench clean cni-config \
	soak load fuzz fuzz-smoke

all: build kernel guest

## deps: Debian packages, the two vhost-user daemons and the Python test client (idempotent).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@command -v vhost-device-vsock >/dev/null || cargo install --locked --root /usr/local vhost-device-vsock --version $(VHOST_DEVICE_VSOCK_VERSION)
	@command -v virtiofsd >/dev/null || cargo install --locked --root /usr/local virtiofsd --version $(VIRTIOFSD_VERSION)
	@rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal || \
		echo "deps: no nightly toolchain could be installed: make fuzz needs one, make fuzz-smoke will skip"
	@command -v cargo-fuzz >/dev/null || cargo install --locked --root /usr/local cargo-fuzz --version $(CARGO_FUZZ_VERSION)
	@$(PY_VENV)/bin/python3 -c 'import sys, kubernetes; sys.exit(kubernetes.__version__ != "$(KUBERNETES_PY_VERSION)")' 2>/dev/null || \
		{ /usr/bin/python3 -m venv $(PY_VENV) && $(PY_VENV)/bin/pip install -q kubernetes==$(KUBERNETES_PY_VERSION); }

## kernel: the guest vmlinux (about 15 minutes the first time, then cached).
kernel: deps
	@mkdir -p $(BUILD)
	@vmlinux=$$(kernel-config/build.sh) && cp -f "$$vmlinux" $(BUILD)/vmlinux.tmp && mv -f $(BUILD)/vmlinux.tmp $(BUILD)/vmlinux
	@echo "kernel: $(BUILD)/vmlinux"

## guest: the static agent and the initramfs whose /init it is.
guest: deps
	CARGO_TARGET_DIR=$(AGENT_TARGET_DIR) guest-agent/mkinitramfs.sh $(BUILD)

## build: the daemon (release).
build: deps
	cargo build --release -p podvisor
	@mkdir -p $(BUILD) && cp -f target/release/podvisor $(BUILD)/podvisor

build-debug: deps
	cargo build -p podvisor
	@mkdir -p $(BUILD) && cp -f target/debug/podvisor $(BUILD)/podvisor

## cni-config: a default bridge pod network, only where /etc/cni/net.d has no configuration.
cni-config:
	@mkdir -p /etc/cni/net.d
	@if ! ls /etc/cni/net.d/*.conflist /etc/cni/net.d/*.conf /etc/cni/net.d/*.json >/dev/null 2>&1; then \
		install -m 0644 etc/10-podvisor.conflist /etc/cni/net.d/10-podvisor.conflist && \
		echo "cni-config: installed /etc/cni/net.d/10-podvisor.conflist"; \
	fi

## run: build everything and start the daemon in the foreground with the defaults.
run: build kernel guest cni-config
	$(BUILD)/podvisor daemon

lint:
	scripts/check-layers.sh
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

## fuzz: every fuzz target for FUZZ_SECONDS each (nightly, libFuzzer + AddressSanitizer).
fuzz: deps
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p ../target/fuzz/corpus/$$t && \
		echo "== fuzz $$t for $(FUZZ_SECONDS) s" && \
		cargo +nightly fuzz run --target-dir ../target/fuzz -O $$t ../target/fuzz/corpus/$$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024 -print_final_stats=1 || exit 1; \
	done

## fuzz-smoke: each fuzz target briefly (part of `make test`).
fuzz-smoke:
	@if rustup toolchain list | grep -q '^nightly'; then $(MAKE) fuzz FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS); \
	else echo "fuzz-smoke: SKIPPED, no nightly toolchain on this machine (cargo-fuzz needs one)"; fi

## test: the same set-up, then every test (unit, agent-on-host, device models, KVM, e2e).
test: build-debug kernel guest lint fuzz-smoke
	PODVISOR_REQUIRE_E2E=1 PODVISOR_BIN=$(BUILD)/podvisor PODVISOR_KERNEL=$(BUILD)/vmlinux \
		PODVISOR_INITRD=$(BUILD)/initramfs.cpio PODVISOR_INITRAMFS=$(BUILD)/initramfs.cpio \
		PODVISOR_AGENT=$(BUILD)/podvisor-agent PODVISOR_PYTHON=$(PY_VENV)/bin/python3 \
		cargo test --workspace -- --test-threads=2
	@# Say why the built-in VMM's full boot test was skipped (or that it ran), uncaptured.
	PODVISOR_BIN=$(BUILD)/podvisor PODVISOR_KERNEL=$(BUILD)/vmlinux PODVISOR_INITRD=$(BUILD)/initramfs.cpio \
		cargo test -p podvisor --lib full_boot -- --nocapture

E2E_ENV = PODVISOR_REQUIRE_E2E=1 PODVISOR_BIN=$(BUILD)/podvisor PODVISOR_KERNEL=$(BUILD)/vmlinux \
	PODVISOR_INITRD=$(BUILD)/initramfs.cpio PODVISOR_INITRAMFS=$(BUILD)/initramfs.cpio \
	PODVISOR_AGENT=$(BUILD)/podvisor-agent

## soak: the crash test with 100 SIGKILLs instead of 20 (PODVISOR_CRASH_SEED=<n> replays a run).
soak: build-debug kernel guest
	$(E2E_ENV) PODVISOR_CRASH_ROUNDS=$${PODVISOR_CRASH_ROUNDS:-100} \
		cargo test -p podvisor-e2e --test crash -- --nocapture

## load: 50 pods started at once, then 1,000 ExecSync across them (make test runs 8 and 100).
load: build-debug kernel guest
	$(E2E_ENV) PODVISOR_LOAD_PODS=$${PODVISOR_LOAD_PODS:-50} PODVISOR_LOAD_EXECS=$${PODVISOR_LOAD_EXECS:-1000} \
		cargo test -p podvisor-e2e --test load -- --nocapture

## bench: figures for the record (pod start latency and memory, network, pulls, VMM overhead).
bench: build kernel guest
	@echo "== pod start latency and per-pod memory ($(BUILD)/podvisor, QEMU or built-in VMM as picked)"
	PODVISOR_BIN=$(BUILD)/podvisor PODVISOR_KERNEL=$(BUILD)/vmlinux PODVISOR_INITRD=$(BUILD)/initramfs.cpio \
		cargo run --release -p podvisor-e2e --bin podvisor-bench
	@echo "== pod network: host -> pod TCP vs a plain netns + veth; port-forward vs loopback"
	PODVISOR_BIN=$(BUILD)/podvisor PODVISOR_KERNEL=$(BUILD)/vmlinux PODVISOR_INITRD=$(BUILD)/initramfs.cpio \
		cargo run --release -p podvisor-e2e --bin podvisor-net-bench
	@echo "== pull + unpack of a multi-layer image vs skopeo copy + umoci unpack"
	cargo bench -p podvisor-image --bench pull_unpack
	@echo "== VM templates: cold boot vs restore, per-pod PSS, pods per memory (built-in VMM; in a nested L1 VM where KVM cannot boot Linux)"
	cargo build --release -p podvisor-e2e --bins
	PODVISOR_BIN=$(BUILD)/podvisor PODVISOR_KERNEL=$(BUILD)/vmlinux PODVISOR_INITRD=$(BUILD)/initramfs.cpio \
		target/release/podvisor-template-bench
	@echo "== built-in VMM: RSS overhead and start -> first guest instruction (1 vCPU, 128 MiB)"
	PODVISOR_BIN=$(BUILD)/podvisor cargo test --release -p podvisor-vmm --test bench -- --ignored --nocapture

clean:
	rm -rf $(BUILD) target
