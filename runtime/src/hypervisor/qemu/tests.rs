//! Boots real QEMU/TCG guests. Artefacts: the guest kernel (env `PODVISOR_KERNEL`, default
//! `build/vmlinux` in the repository), the agent initramfs (env `PODVISOR_INITRD`, default
//! `build/initramfs.cpio`), and for the busybox guests `/bin/busybox` (static) and
//! `cpio`. A test whose artefact is absent skips with a reason, unless `PODVISOR_REQUIRE_E2E=1`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command as StdCommand;
use std::time::{Duration, Instant};

use super::*;
use crate::agent::GuestAgent;
use crate::hypervisor::{process_alive, BlockDevice, KillOnDrop, SharedDir};

fn require_e2e() -> bool {
    std::env::var("PODVISOR_REQUIRE_E2E").map(|v| v == "1").unwrap_or(false)
}

/// Returns the artefact, or None after printing why the test skips (panics under
/// PODVISOR_REQUIRE_E2E=1).
fn artefact(env: &str, default: &str) -> Option<PathBuf> {
    let path = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(default));
    if path.is_file() {
        return Some(path);
    }
    let reason = format!("{} not found (set {env})", path.display());
    assert!(!require_e2e(), "PODVISOR_REQUIRE_E2E=1 but {reason}");
    eprintln!("SKIP: {reason}");
    None
}

fn kernel() -> Option<PathBuf> {
    artefact("PODVISOR_KERNEL", "build/vmlinux")
}

/// The console copier is the daemon binary's `console-log` (this test binary has none).
fn console_command() -> Option<Vec<OsString>> {
    let bin = artefact("PODVISOR_BIN", "target/debug/podvisor")?;
    Some(vec![bin.into(), "console-log".into()])
}

fn hypervisor() -> Option<QemuHypervisor> {
    let console_command = console_command()?;
    // As the daemon runs them: confined, when the test may (as root).
    let jail = nix::unistd::geteuid().is_root().then_some(JailIds { first: 400_000, count: 1_000 });
    let config = QemuConfig { accel: Accel::Auto, console_command, jail, ..QemuConfig::default() };
    match QemuHypervisor::new(config) {
        Ok(hv) => Some(hv),
        Err(e) => {
            assert!(!require_e2e(), "PODVISOR_REQUIRE_E2E=1 but {e}");
            eprintln!("SKIP: {e}");
            None
        }
    }
}

/// An initramfs whose /init is `script` run by a static busybox.
fn busybox_initrd(dir: &Path, script: &str) -> Option<PathBuf> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        assert!(!require_e2e(), "PODVISOR_REQUIRE_E2E=1 but /bin/busybox is missing");
        eprintln!("SKIP: /bin/busybox not found (apt-get install busybox-static)");
        return None;
    }
    let root = dir.join("initrd-root");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\nmkdir -p /proc /sys /dev /mnt\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n{script}\n"
    );
    std::fs::write(root.join("init"), init).unwrap();
    std::fs::set_permissions(root.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("initrd.cpio");
    let status = StdCommand::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet > '{}'",
            root.display(),
            out.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed (apt-get install cpio)");
    Some(out)
}

fn vm_config(dir: &Path, kernel: PathBuf, initrd: PathBuf) -> VmConfig {
    VmConfig {
        sandbox_id: "test".into(),
        vcpus: 1,
        memory_mib: 192,
        kernel,
        initrd,
        extra_kernel_args: String::new(),
        run_dir: dir.join("run"),
        console_log: dir.join("console.log"),
        console_log_max_bytes: podvisor_vmm::console::DEFAULT_MAX_BYTES,
        shared_dirs: vec![],
        block_devices: vec![],
        net_devices: vec![],
    }
}

/// Waits until the console log holds `marker`; returns the log.
async fn wait_console(log: &Path, marker: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(marker) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "no {marker:?} on the console within {timeout:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_qemu_exit(hv: &QemuHypervisor, vm: &VmHandle, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while hv.is_running(vm) {
        assert!(Instant::now() < deadline, "QEMU still runs after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Processes whose command line mentions `needle` (the test's unique temp dir): catches
/// helpers' own children (virtiofsd's sandbox) that VmHandle does not record.
fn processes_mentioning(needle: &Path) -> Vec<String> {
    let needle = needle.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid == std::process::id() as i32 {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{pid}: {cmdline}"));
        }
    }
    found
}

/// Launches `config`, failing with the log of the process that failed.
async fn launch(hv: &QemuHypervisor, config: &VmConfig) -> VmHandle {
    match hv.launch(config).await {
        Ok(vm) => vm,
        Err(e @ HypervisorError::EarlyExit { .. }) => {
            let HypervisorError::EarlyExit { log, .. } = &e else { unreachable!() };
            panic!("{e}: {}", std::fs::read_to_string(log).unwrap_or_default())
        }
        Err(e) => panic!("{e}"),
    }
}

/// Stops and cleans up, then checks that nothing of the VM is left.
async fn stop_and_check_nothing_left(hv: &QemuHypervisor, vm: &VmHandle, tmp: &Path) {
    hv.stop(vm, Duration::from_secs(2)).await.unwrap();
    assert!(vm.processes.iter().all(|p| !process_alive(p)), "{:?}", vm.processes);
    // virtiofsd's sandboxed child dies with its parent (PR_SET_PDEATHSIG); give it a moment.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !processes_mentioning(tmp).is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(processes_mentioning(tmp), Vec::<String>::new());
    hv.cleanup(vm).await.unwrap();
    assert!(!vm.run_dir.exists(), "{} survived cleanup", vm.run_dir.display());
    // Stopping and cleaning up a gone VM is fine.
    hv.stop(vm, Duration::from_millis(100)).await.unwrap();
    hv.cleanup(vm).await.unwrap();
}

/// A busybox guest with a virtio-fs share and a read-only disk, on 2 vCPUs: it proves the
/// devices reach the guest, then reboots, which makes QEMU exit by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busybox_guest_sees_devices_and_powers_off() {
    let (Some(kernel), Some(hv)) = (kernel(), hypervisor()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let script = "mount -t virtiofs share /mnt && cat /mnt/hello.txt\n\
                  echo \"vcpus=$(nproc) disk=$(cat /sys/block/vda/serial) ro=$(cat /sys/block/vda/ro)\"\n\
                  echo PODVISOR-BUSYBOX-DONE\nreboot -f";
    let Some(initrd) = busybox_initrd(tmp.path(), script) else { return };
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    std::fs::write(share.join("hello.txt"), "hello from the host\n").unwrap();
    let disk = tmp.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut config = vm_config(tmp.path(), kernel, initrd);
    config.vcpus = 2;
    config.shared_dirs.push(SharedDir {
        tag: "share".into(),
        host_path: share,
        read_only: true,
        cache: "always".into(),
        ids: Default::default(),
    });
    config.block_devices.push(BlockDevice { id: "disk0".into(), path: disk, read_only: true });

    let started = Instant::now();
    let vm = launch(&hv, &config).await;
    let _kill = KillOnDrop(vm.processes.clone());
    println!("start() returned after {:?}", started.elapsed());
    let names: Vec<&str> = vm.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["qemu", "vhost-device-vsock", "virtiofsd-share", "console"]);
    assert!(vm.vsock_uds.exists());
    let console =
        wait_console(&config.console_log, "PODVISOR-BUSYBOX-DONE", Duration::from_secs(120)).await;
    println!("guest reached the end of /init after {:?}", started.elapsed());
    assert!(console.contains("hello from the host"), "{console}");
    assert!(console.contains("vcpus=2 disk=disk0 ro=1"), "{console}");
    wait_qemu_exit(&hv, &vm, Duration::from_secs(30)).await;
    stop_and_check_nothing_left(&hv, &vm, tmp.path()).await;
}

/// stop() on a running guest leaves no process, and cleanup no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_running_vm_leaves_nothing() {
    let (Some(kernel), Some(hv)) = (kernel(), hypervisor()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let Some(initrd) =
        busybox_initrd(tmp.path(), "echo PODVISOR-IDLE\nwhile true; do sleep 1; done")
    else {
        return;
    };
    let share = tmp.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let mut config = vm_config(tmp.path(), kernel, initrd);
    config.shared_dirs.push(SharedDir {
        tag: "podvisor".into(),
        host_path: share,
        read_only: false,
        cache: "auto".into(),
        ids: Default::default(),
    });
    let vm = hv.launch(&config).await.unwrap();
    let _kill = KillOnDrop(vm.processes.clone());
    wait_console(&config.console_log, "PODVISOR-IDLE", Duration::from_secs(120)).await;
    assert!(hv.is_running(&vm));
    // Each process leads its own group, so signals aimed at the daemon's group spare the VM.
    for p in &vm.processes {
        let pgid = nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(p.pid))).unwrap();
        assert_eq!(pgid.as_raw(), p.pid, "{}", p.name);
    }
    stop_and_check_nothing_left(&hv, &vm, tmp.path()).await;
    // The console log is the caller's: it stays.
    assert!(config.console_log.exists());
}

/// A guest that floods its serial console leaves a log within the cap, ending with what it
/// printed last (QEMU's `file` chardev used to append all of it, into host RAM on tmpfs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_its_console_leaves_a_capped_log() {
    let (Some(kernel), Some(hv)) = (kernel(), hypervisor()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let script = "yes 'flooding the serial console, flooding the serial console' | head -n 16000\n\
                  echo PODVISOR-FLOOD-DONE\nreboot -f";
    let Some(initrd) = busybox_initrd(tmp.path(), script) else { return };
    let mut config = vm_config(tmp.path(), kernel, initrd);
    let cap = 64 * 1024;
    config.console_log_max_bytes = cap;
    let vm = hv.launch(&config).await.unwrap();
    let _kill = KillOnDrop(vm.processes.clone());
    wait_qemu_exit(&hv, &vm, Duration::from_secs(180)).await;
    // The copier has drained the pipe once the VM counts as exited.
    tokio::time::timeout(Duration::from_secs(10), hv.exited(&vm)).await.unwrap();
    let size = std::fs::metadata(&config.console_log).unwrap().len();
    let text = std::fs::read_to_string(&config.console_log).unwrap_or_default();
    println!("console log: {size} bytes after about 1 MiB of output");
    assert!(size <= cap, "the console log grew to {size} bytes");
    assert!(text.contains("PODVISOR-FLOOD-DONE"), "{text}");
    stop_and_check_nothing_left(&hv, &vm, tmp.path()).await;
}

/// A start that QEMU rejects (a directory as a disk) names QEMU's log and leaves no process.
#[tokio::test]
async fn failed_start_names_the_log_and_cleans_up() {
    let (Some(kernel), Some(hv)) = (kernel(), hypervisor()) else { return };
    let tmp = tempfile::tempdir().unwrap();
    let mut config = vm_config(tmp.path(), kernel.clone(), kernel);
    config.block_devices.push(BlockDevice {
        id: "dir".into(),
        path: tmp.path().to_path_buf(),
        read_only: true,
    });
    let result = hv.launch(&config).await;
    if let Ok(vm) = &result {
        hv.stop(vm, Duration::from_secs(1)).await.unwrap();
    }
    let err = result.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HypervisorError::EarlyExit { .. }), "{text}");
    assert!(text.contains("qemu.log"), "{text}");
    let log = std::fs::read_to_string(config.run_dir.join("qemu.log")).unwrap();
    println!("{text}\nqemu.log: {log}");
    assert!(log.contains("regular file"), "{log}");
    assert_eq!(processes_mentioning(tmp.path()), Vec::<String>::new());
}

#[test]
fn missing_binary_has_an_install_hint() {
    let err = QemuHypervisor::new(QemuConfig {
        vhost_vsock_binary: "/nonexistent/vhost-device-vsock".into(),
        ..QemuConfig::default()
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, HypervisorError::MissingBinary { .. }));
    // Whichever binary is missing first on this machine, its hint says how to install it.
    assert!(text.contains("apt-get install") || text.contains("cargo install"), "{text}");
}

/// TCG is no security boundary: with `allow_tcg = false` the backend refuses to run on it.
#[test]
fn tcg_is_refused_when_not_allowed() {
    let Some(console_command) = console_command() else { return };
    let config = QemuConfig {
        accel: Accel::Tcg,
        allow_tcg: false,
        console_command,
        ..QemuConfig::default()
    };
    match QemuHypervisor::new(config) {
        Err(HypervisorError::InvalidConfig(text)) => {
            assert!(text.contains("not a security boundary"), "{text}")
        }
        Err(HypervisorError::MissingBinary { .. }) if !require_e2e() => {}
        other => panic!("TCG accepted with allow_tcg = false: {other:?}"),
    }
}

/// The real agent: boot, Ping (measuring boot→Ping), then Shutdown makes QEMU exit by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_answers_ping_then_shuts_the_vm_down() {
    let (Some(kernel), Some(hv)) = (kernel(), hypervisor()) else { return };
    let Some(initrd) = artefact("PODVISOR_INITRD", "build/initramfs.cpio") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let config = vm_config(tmp.path(), kernel, initrd);
    let mut config = config;
    let prepared = crate::hypervisor::RunRoot(tmp.path().join("vms")).prepare("test").unwrap();
    config.run_dir = prepared.run_dir().to_path_buf();
    let started = Instant::now();
    let vm = hv.launch(&config).await.unwrap();
    let _kill = KillOnDrop(vm.processes.clone());
    let vmm_up = started.elapsed();
    let agent =
        crate::agent::grpc::GrpcAgent::new(hv.agent_connector(&vm), Duration::from_secs(10));
    let booted = async {
        hv.wait_agent_ready(prepared, &vm, Duration::from_secs(120))
            .await
            .map_err(|e| e.to_string())?;
        agent.status().await.map_err(|e| e.to_string())
    };
    let pong = match booted.await {
        Ok(pong) => pong,
        Err(e) => {
            let console = std::fs::read_to_string(&config.console_log).unwrap_or_default();
            hv.stop(&vm, Duration::from_secs(1)).await.unwrap();
            panic!("{e}\nconsole:\n{console}");
        }
    };
    let boot_to_ping = started.elapsed();
    println!(
        "accel {:?}: QEMU up after {vmm_up:?}, boot->Ping {boot_to_ping:?} \
         (agent {} reports guest uptime {:.2}s)",
        hv.accel().0,
        pong.version,
        pong.uptime_seconds
    );
    // The VM may go away before the answer: the result does not matter.
    let _ = agent.shutdown().await;
    wait_qemu_exit(&hv, &vm, Duration::from_secs(60)).await;
    println!("QEMU exited by itself {:?} after boot", started.elapsed());
    stop_and_check_nothing_left(&hv, &vm, tmp.path()).await;
}

fn sh(cmd: &str) {
    let status = StdCommand::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(status.success(), "{cmd} failed");
}

/// Unmounts the share's two mount points and everything under them when dropped (lazily: a
/// failed test must not leave mounts behind).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        for dir in ["shared", "mounts"] {
            let _ = StdCommand::new("umount").arg("-R").arg("-l").arg(self.0.join(dir)).status();
        }
    }
}

/// The sandbox manager's layout (as Kata's): `mounts/` is a shared bind mount where the host
/// bind-mounts image rootfs directories while the VM runs; `shared/` is a read-only slave bind
/// of it, served by virtiofsd in its default namespace sandbox. Mounts made under `mounts/`
/// after the VM started must show in the guest, with either cache mode. A directory the guest
/// looked up *before* the host mounted over it keeps showing the covered directory (virtiofsd
/// holds the old inode): the sandbox manager must mount on fresh paths only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtiofs_sees_bind_mounts_made_after_start() {
    let (Some(kernel), Some(hv)) = (kernel(), hypervisor()) else { return };
    if !nix::unistd::geteuid().is_root() {
        assert!(!require_e2e(), "PODVISOR_REQUIRE_E2E=1 but mounting needs root");
        eprintln!("SKIP: mounting needs root");
        return;
    }
    for cache in ["always", "auto"] {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path().display();
        // The guest waits for `go`, then reads through the mount made after boot. `early/` was
        // listed by the guest before the host mounted over it.
        let script = "mount -t virtiofs podvisor /mnt && ls /mnt/early >/dev/null && echo GUEST-READY\n\
                      i=0; while [ ! -e /mnt/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
                      echo \"late=[$(cat /mnt/c1/rootfs/marker)]\"\n\
                      echo \"early=[$(cat /mnt/early/marker)]\"\n\
                      echo GUEST-DONE\nwhile true; do sleep 1; done";
        let Some(initrd) = busybox_initrd(tmp.path(), script) else { return };
        let _unmount = Unmount(tmp.path().join("share"));
        sh(&format!(
            "mkdir -p {t}/share/mounts/early {t}/share/shared {t}/image && echo image-content > {t}/image/marker \
             && mount --bind {t}/share/mounts {t}/share/mounts && mount --make-private {t}/share/mounts \
             && mount --make-shared {t}/share/mounts \
             && mount --bind {t}/share/mounts {t}/share/shared && mount --make-slave {t}/share/shared \
             && mount -o remount,bind,ro {t}/share/shared"
        ));
        let mut config = vm_config(tmp.path(), kernel.clone(), initrd);
        config.shared_dirs.push(SharedDir {
            tag: "podvisor".into(),
            host_path: tmp.path().join("share/shared"),
            read_only: true,
            cache: cache.into(),
            ids: Default::default(),
        });
        let vm = hv.launch(&config).await.unwrap();
        let _kill = KillOnDrop(vm.processes.clone());
        wait_console(&config.console_log, "GUEST-READY", Duration::from_secs(120)).await;
        sh(&format!(
            "mkdir -p {t}/share/mounts/c1/rootfs && mount --bind -o ro {t}/image {t}/share/mounts/c1/rootfs \
             && mount --bind -o ro {t}/image {t}/share/mounts/early && touch {t}/share/mounts/go"
        ));
        let console =
            wait_console(&config.console_log, "GUEST-DONE", Duration::from_secs(120)).await;
        let seen = |what: &str| {
            console.lines().find(|l| l.starts_with(what)).unwrap_or("(missing)").to_string()
        };
        println!("cache={cache}: {} {}", seen("late="), seen("early="));
        stop_and_check_nothing_left(&hv, &vm, tmp.path()).await;
        assert!(console.contains("late=[image-content]"), "cache={cache}:\n{console}");
        assert!(console.contains("early=[]"), "cache={cache}: the caveat changed:\n{console}");
    }
}

/// virtiofsd's socket is given to the VM's uid while vhost-device-vsock (that uid) already
/// runs: a symlink it put in the socket's place must not hand the VM a root file.
#[test]
fn giving_virtiofs_sockets_does_not_follow_a_symlink() {
    use std::os::unix::fs::MetadataExt;
    if !nix::unistd::Uid::effective().is_root() {
        println!("SKIP: chown needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = vm_config(dir.path(), "k".into(), "i".into());
    config.shared_dirs = vec![SharedDir {
        tag: "podvisor".into(),
        host_path: dir.path().join("share"),
        read_only: false,
        cache: "auto".into(),
        ids: Default::default(),
    }];
    std::fs::create_dir_all(&config.run_dir).unwrap();
    let layout = RunDirLayout::new(&config.run_dir);
    let target = dir.path().join("root-file");
    std::fs::write(&target, "").unwrap();
    std::os::unix::fs::symlink(&target, layout.virtiofs_socket("podvisor")).unwrap();
    give_virtiofs_sockets(&config, &layout, 64_997).unwrap();
    assert_eq!(std::fs::metadata(&target).unwrap().uid(), 0, "the symlink's target was given away");
}
