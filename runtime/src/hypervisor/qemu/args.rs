//! Command lines of QEMU and its vhost-user helpers, built from a [`VmConfig`] without touching
//! the system, so that every device's arguments can be unit-tested.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::hypervisor::{HypervisorError, Result, VmConfig};

/// The guest's vsock context id. Every VM has its own vhost-device-vsock, so all can use 3.
pub const GUEST_CID: u32 = 3;

/// virtio-fs limits tags to 36 bytes (`struct virtio_fs_config`).
const MAX_FS_TAG_LEN: usize = 36;

/// The accelerator QEMU is started with, once `Auto` has been resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl ResolvedAccel {
    pub fn as_str(self) -> &'static str {
        match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        }
    }
}

/// Where a VM's sockets, pid files and logs live inside its run directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDirLayout {
    pub run_dir: PathBuf,
}

impl RunDirLayout {
    pub fn new(run_dir: &Path) -> Self {
        Self { run_dir: run_dir.to_path_buf() }
    }
    /// vhost-user socket between QEMU and vhost-device-vsock.
    pub fn vhost_vsock_socket(&self) -> PathBuf {
        self.run_dir.join("vhost-vsock.sock")
    }
    /// The hybrid-vsock socket the host connects to.
    pub fn vsock_uds(&self) -> PathBuf {
        super::super::process::vsock_uds(&self.run_dir)
    }
    /// QEMU's QMP monitor: its greeting tells that the machine is built and running.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    pub fn virtiofs_socket(&self, tag: &str) -> PathBuf {
        super::super::process::virtiofs_socket(&self.run_dir, tag)
    }
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join("qemu.log")
    }
    pub fn vhost_vsock_log(&self) -> PathBuf {
        self.run_dir.join("vhost-device-vsock.log")
    }
    /// What the console copier itself reports (not the console).
    pub fn console_helper_log(&self) -> PathBuf {
        self.run_dir.join("console-log.log")
    }
}

/// Checks what QEMU would otherwise reject late (or misparse) before anything is spawned.
pub fn validate(config: &VmConfig) -> Result<()> {
    let invalid = |msg: String| Err(HypervisorError::InvalidConfig(msg));
    if config.vcpus == 0 {
        return invalid("vcpus must be at least 1".into());
    }
    if config.memory_mib < 64 {
        return invalid(format!(
            "memory_mib {} is below the 64 MiB a guest needs",
            config.memory_mib
        ));
    }
    for (what, path) in [("kernel", &config.kernel), ("initrd", &config.initrd)] {
        if !path.is_file() {
            return invalid(format!("{what} {} is not a file", path.display()));
        }
    }
    let mut tags = std::collections::HashSet::new();
    for dir in &config.shared_dirs {
        if dir.tag.is_empty() || dir.tag.len() > MAX_FS_TAG_LEN || !is_plain_id(&dir.tag) {
            return invalid(format!(
                "virtio-fs tag {:?} must be 1-{MAX_FS_TAG_LEN} characters of [A-Za-z0-9_.-]",
                dir.tag
            ));
        }
        if !tags.insert(dir.tag.as_str()) {
            return invalid(format!("virtio-fs tag {:?} is used twice", dir.tag));
        }
        if !dir.host_path.is_dir() {
            return invalid(format!(
                "shared directory {} (tag {}) is not a directory",
                dir.host_path.display(),
                dir.tag
            ));
        }
        if !matches!(dir.cache.as_str(), "auto" | "always" | "never" | "metadata") {
            return invalid(format!(
                "virtio-fs cache mode {:?} (tag {}) is not one of auto, always, never, metadata",
                dir.cache, dir.tag
            ));
        }
    }
    let mut ids = std::collections::HashSet::new();
    for dev in &config.block_devices {
        if !is_plain_id(&dev.id) || !ids.insert(format!("blk-{}", dev.id)) {
            return invalid(format!("block device id {:?} is empty, invalid or repeated", dev.id));
        }
        if !dev.path.exists() {
            return invalid(format!(
                "block device {} ({}) does not exist",
                dev.id,
                dev.path.display()
            ));
        }
    }
    for dev in &config.net_devices {
        if !is_plain_id(&dev.id) || !ids.insert(format!("net-{}", dev.id)) {
            return invalid(format!("net device id {:?} is empty, invalid or repeated", dev.id));
        }
        // IFNAMSIZ is 16 including the terminating NUL.
        if dev.tap.is_empty() || dev.tap.len() > 15 || !is_plain_id(&dev.tap) {
            return invalid(format!("tap name {:?} is not a valid interface name", dev.tap));
        }
        if !is_mac(&dev.mac) {
            return invalid(format!(
                "MAC address {:?} of net device {} is malformed",
                dev.mac, dev.id
            ));
        }
    }
    Ok(())
}

fn is_plain_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// QEMU option values are comma-separated: a literal comma is written twice.
fn escape_opt(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        out.push(b);
        if b == b',' {
            out.push(b',');
        }
    }
    OsString::from_vec(out)
}

/// `prefix` followed by a path escaped for a QEMU option list.
fn opt_with_path(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(escape_opt(path.as_os_str()));
    s.push(suffix);
    s
}

/// `vhost-device-vsock` for one VM (0.3 syntax).
pub fn vhost_vsock_args(layout: &RunDirLayout) -> Vec<OsString> {
    vec![
        "--guest-cid".into(),
        GUEST_CID.to_string().into(),
        "--socket".into(),
        layout.vhost_vsock_socket().into(),
        "--uds-path".into(),
        layout.vsock_uds().into(),
    ]
}

/// What a guest needs to boot on an overloaded host, as Kata passes it: `no_timer_check`
/// skips the IO-APIC timer check, which panics the guest ("IO-APIC + timer doesn't work!")
/// when its vCPU thread was not scheduled for the few ticks it counts; `tsc=reliable` keeps
/// the clocksource watchdog from declaring the (TCG or KVM) TSC unstable for the same reason.
pub const BOOT_UNDER_LOAD_ARGS: &str = "no_timer_check tsc=reliable";

/// The guest kernel command line: ours, then the caller's extra arguments. `reboot=t` makes a
/// guest reboot a triple fault, which `-no-reboot` turns into QEMU exiting: that is how the
/// guest powers off (microvm without ACPI has no power-off device). [`BOOT_UNDER_LOAD_ARGS`]
/// keep an overloaded host from failing the boot.
pub fn kernel_cmdline(config: &VmConfig) -> String {
    let mut cmdline = format!("console=ttyS0 reboot=t panic=-1 {BOOT_UNDER_LOAD_ARGS}");
    let extra = config.extra_kernel_args.trim();
    if !extra.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    cmdline
}

/// The descriptors QEMU inherits besides the taps (which `-netdev tap,fd=` names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InheritedFds {
    /// The write end of the console copier's pipe.
    pub console: std::os::fd::RawFd,
    /// One open file per [`VmConfig::block_devices`] entry, in order.
    pub block: Vec<std::os::fd::RawFd>,
}

/// QEMU's fd set holding the console pipe; block device `i` is in set `i + 2`.
const CONSOLE_FDSET: usize = 1;

/// The CPU model: under KVM the host's; TCG emulates what `max` lists (the guest kernel wants
/// more than the default `qemu64`).
fn cpu_model(accel: ResolvedAccel) -> &'static str {
    match accel {
        ResolvedAccel::Kvm => "host",
        ResolvedAccel::Tcg => "max",
    }
}

/// QEMU's full argument list (without the binary). Files are passed as inherited descriptors
/// in fd sets (`-add-fd`, opened as `/dev/fdset/N`), never by path: a jailed QEMU sees no
/// more than its run directory, kernel and initramfs, and needs no /proc for `/dev/fd/N`.
pub fn qemu_args(
    config: &VmConfig,
    layout: &RunDirLayout,
    accel: ResolvedAccel,
    fds: &InheritedFds,
) -> Vec<OsString> {
    let mem = config.memory_mib;
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(OsString::from));
    push(&[
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off,isa-serial=on,memory-backend=mem",
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-m",
        &format!("{mem}M"),
        "-smp",
        &config.vcpus.to_string(),
        "-cpu",
        cpu_model(accel),
        "-accel",
        accel.as_str(),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        // QEMU's own seccomp filter: no obsolete syscalls, no setuid/setgid, no fork/exec, no
        // scheduler or resource-limit changes. A guest that breaks QEMU gets little further.
        "-sandbox",
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        // The daemon talks to QEMU only through QMP; nothing may read the daemon's stdin.
        "-monitor",
        "none",
    ]);
    args.push("-kernel".into());
    args.push(config.kernel.clone().into());
    args.push("-initrd".into());
    args.push(config.initrd.clone().into());
    args.push("-append".into());
    args.push(kernel_cmdline(config).into());

    args.push("-add-fd".into());
    args.push(format!("fd={},set={CONSOLE_FDSET}", fds.console).into());
    args.push("-chardev".into());
    // append=on: without it QEMU truncates what it opens, which fails (EINVAL) on a pipe.
    args.push(format!("file,id=console,path=/dev/fdset/{CONSOLE_FDSET},append=on").into());
    args.push("-serial".into());
    args.push("chardev:console".into());

    args.push("-chardev".into());
    args.push(opt_with_path("socket,id=qmp,server=on,wait=off,path=", &layout.qmp_socket(), ""));
    args.push("-mon".into());
    args.push("chardev=qmp,mode=control".into());

    args.push("-chardev".into());
    args.push(opt_with_path("socket,id=vsock,path=", &layout.vhost_vsock_socket(), ""));
    args.push("-device".into());
    args.push("vhost-user-vsock-device,chardev=vsock".into());

    for dir in &config.shared_dirs {
        let tag = &dir.tag;
        args.push("-chardev".into());
        args.push(opt_with_path(
            &format!("socket,id=fs-{tag},path="),
            &layout.virtiofs_socket(tag),
            "",
        ));
        args.push("-device".into());
        args.push(format!("vhost-user-fs-device,chardev=fs-{tag},tag={tag}").into());
    }

    for (index, (dev, fd)) in config.block_devices.iter().zip(&fds.block).enumerate() {
        let id = &dev.id;
        let readonly = if dev.read_only { "on" } else { "off" };
        let set = index + CONSOLE_FDSET + 1;
        args.push("-add-fd".into());
        args.push(format!("fd={fd},set={set}").into());
        args.push("-drive".into());
        args.push(
            format!("if=none,id=blk-{id},format=raw,readonly={readonly},file=/dev/fdset/{set}")
                .into(),
        );
        args.push("-device".into());
        // The serial (visible as /sys/block/vdX/serial, 20 bytes at most) lets the guest find
        // the disk by id whatever order the MMIO transports are probed in.
        let serial: String = id.chars().take(20).collect();
        args.push(format!("virtio-blk-device,drive=blk-{id},serial={serial}").into());
    }

    for dev in &config.net_devices {
        let id = &dev.id;
        args.push("-netdev".into());
        let backend = match &dev.tap_fd {
            // vhost-net would need /dev/vhost-net and the namespace's view of the tap.
            Some(fd) => format!("tap,id=net-{id},fd={},vhost=off", fd.raw()),
            None => format!("tap,id=net-{id},ifname={},script=no,downscript=no", dev.tap),
        };
        args.push(backend.into());
        args.push("-device".into());
        args.push(format!("virtio-net-device,netdev=net-{id},mac={}", dev.mac).into());
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{BlockDevice, NetDevice, SharedDir};

    fn config(dir: &Path) -> VmConfig {
        let kernel = dir.join("vmlinux");
        let initrd = dir.join("initrd");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::write(&initrd, b"i").unwrap();
        VmConfig {
            sandbox_id: "sb".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel,
            initrd,
            extra_kernel_args: " quiet ".into(),
            run_dir: dir.join("run"),
            console_log: dir.join("console,log"),
            console_log_max_bytes: podvisor_vmm::console::DEFAULT_MAX_BYTES,
            shared_dirs: vec![],
            block_devices: vec![],
            net_devices: vec![],
        }
    }

    fn fds(block: Vec<std::os::fd::RawFd>) -> InheritedFds {
        InheritedFds { console: 9, block }
    }

    fn joined(args: &[OsString]) -> String {
        args.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn base_command_line() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(tmp.path());
        let layout = RunDirLayout::new(&cfg.run_dir);
        let line = joined(&qemu_args(&cfg, &layout, ResolvedAccel::Tcg, &fds(vec![])));
        assert!(line.starts_with(
            "-M microvm,x-option-roms=off,rtc=off,acpi=off,isa-serial=on,memory-backend=mem \
             -object memory-backend-memfd,id=mem,size=128M,share=on -m 128M -smp 1 -cpu max \
             -accel tcg -nodefaults -no-user-config -nographic -no-reboot \
             -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
        ));
        assert!(line.contains(
            "-append console=ttyS0 reboot=t panic=-1 no_timer_check tsc=reliable quiet -add-fd"
        ));
        // The console goes to the copier's pipe, never to a file QEMU appends to unbounded.
        assert!(line.contains(
            "-add-fd fd=9,set=1 -chardev file,id=console,path=/dev/fdset/1,append=on \
             -serial chardev:console"
        ));
        assert!(line.contains(&format!(
            "socket,id=vsock,path={}/run/vhost-vsock.sock -device vhost-user-vsock-device,chardev=vsock",
            tmp.path().display()
        )));
        let kvm = joined(&qemu_args(&cfg, &layout, ResolvedAccel::Kvm, &fds(vec![])));
        assert!(kvm.contains("-cpu host -accel kvm "), "{kvm}");
        assert!(validate(&cfg).is_ok());
    }

    #[test]
    fn devices() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(tmp.path());
        cfg.vcpus = 2;
        cfg.shared_dirs.push(SharedDir {
            tag: "podvisor".into(),
            host_path: tmp.path().to_path_buf(),
            read_only: true,
            cache: "always".into(),
            ids: Default::default(),
        });
        let disk = tmp.path().join("disk.img");
        std::fs::write(&disk, [0u8; 512]).unwrap();
        cfg.block_devices.push(BlockDevice {
            id: "vol1".into(),
            path: disk.clone(),
            read_only: true,
        });
        cfg.net_devices.push(NetDevice {
            id: "eth0".into(),
            tap: "tap0".into(),
            mac: "02:00:00:00:00:01".into(),
            tap_fd: None,
        });
        let tap = std::fs::File::open("/dev/null").unwrap();
        let tap = crate::hypervisor::TapFd(std::sync::Arc::new(tap.into()));
        cfg.net_devices.push(NetDevice {
            id: "eth1".into(),
            tap: "tap1".into(),
            mac: "02:00:00:00:00:02".into(),
            tap_fd: Some(tap.clone()),
        });
        assert_eq!(cfg.inherited_fds(), vec![tap.raw()]);
        validate(&cfg).unwrap();
        let layout = RunDirLayout::new(&cfg.run_dir);
        let line = joined(&qemu_args(&cfg, &layout, ResolvedAccel::Tcg, &fds(vec![11])));
        let run = cfg.run_dir.display();
        assert!(line.contains("-smp 2 "));
        assert!(line.contains(&format!(
            "-chardev socket,id=fs-podvisor,path={run}/virtiofs-podvisor.sock \
             -device vhost-user-fs-device,chardev=fs-podvisor,tag=podvisor"
        )));
        assert!(line.contains(
            "-add-fd fd=11,set=2 -drive if=none,id=blk-vol1,format=raw,readonly=on,\
             file=/dev/fdset/2 -device virtio-blk-device,drive=blk-vol1,serial=vol1"
        ));
        assert!(line.contains(
            "-netdev tap,id=net-eth0,ifname=tap0,script=no,downscript=no \
             -device virtio-net-device,netdev=net-eth0,mac=02:00:00:00:00:01"
        ));
        assert!(line.contains(&format!(
            "-netdev tap,id=net-eth1,fd={},vhost=off \
             -device virtio-net-device,netdev=net-eth1,mac=02:00:00:00:00:02",
            tap.raw()
        )));
        assert_eq!(
            joined(&crate::hypervisor::process::virtiofsd_args(
                &layout.run_dir,
                &cfg.shared_dirs[0]
            )),
            format!(
                "--socket-path={run}/virtiofs-podvisor.sock --shared-dir={} --cache=always \
                 --sandbox=namespace --seccomp=kill --readonly",
                tmp.path().display()
            )
        );
        // A pod with a user namespace: its owners translated, both ways and squashed.
        let mut translated = cfg.shared_dirs[0].clone();
        translated.ids.uids =
            vec![crate::hypervisor::IdTranslation::Map { guest: 131_072, host: 0, count: 65_536 }];
        translated.ids.gids = vec![crate::hypervisor::IdTranslation::SquashHost {
            host: 131_072,
            guest: 65_534,
            count: 65_536,
        }];
        let args =
            joined(&crate::hypervisor::process::virtiofsd_args(&layout.run_dir, &translated));
        assert!(
            args.ends_with(
                "--readonly --translate-uid=map:131072:0:65536 \
                 --translate-gid=squash-host:131072:65534:65536"
            ),
            "{args}"
        );
        assert_eq!(
            joined(&vhost_vsock_args(&layout)),
            format!("--guest-cid 3 --socket {run}/vhost-vsock.sock --uds-path {run}/vsock.sock")
        );
    }

    #[test]
    fn rejects_bad_input() {
        let tmp = tempfile::tempdir().unwrap();
        let base = config(tmp.path());
        let share = |tag: &str, cache: &str| SharedDir {
            tag: tag.into(),
            host_path: tmp.path().to_path_buf(),
            read_only: false,
            cache: cache.into(),
            ids: Default::default(),
        };
        type Mutation<'a> = Box<dyn Fn(&mut VmConfig) + 'a>;
        let cases: Vec<Mutation<'_>> = vec![
            Box::new(|c| c.vcpus = 0),
            Box::new(|c| c.memory_mib = 1),
            Box::new(|c| c.kernel = "/nonexistent/vmlinux".into()),
            Box::new(move |c| c.shared_dirs = vec![share("a,b", "auto")]),
            Box::new(move |c| c.shared_dirs = vec![share(&"x".repeat(37), "auto")]),
            Box::new(move |c| c.shared_dirs = vec![share("a", "sometimes")]),
            Box::new(move |c| c.shared_dirs = vec![share("a", "auto"), share("a", "auto")]),
            Box::new(|c| {
                c.net_devices = vec![NetDevice {
                    id: "n".into(),
                    tap: "t".into(),
                    mac: "02:00".into(),
                    tap_fd: None,
                }]
            }),
            Box::new(|c| {
                c.net_devices = vec![NetDevice {
                    id: "n".into(),
                    tap: "a-tap-name-that-is-too-long".into(),
                    mac: "02:00:00:00:00:01".into(),
                    tap_fd: None,
                }]
            }),
            Box::new(|c| {
                c.block_devices = vec![BlockDevice {
                    id: "b".into(),
                    path: "/nonexistent".into(),
                    read_only: false,
                }]
            }),
        ];
        for (i, mutate) in cases.iter().enumerate() {
            let mut cfg = base.clone();
            mutate(&mut cfg);
            assert!(
                matches!(validate(&cfg), Err(HypervisorError::InvalidConfig(_))),
                "case {i} was accepted"
            );
        }
    }
}
