//! End-to-end checks of how QEMU's VM processes are confined (`hypervisor = "qemu"`, the
//! defaults): each pod's QEMU, vhost-device-vsock and console copier run as that pod's own
//! unprivileged uid with no capabilities, `no_new_privs` and a seccomp filter, in a mount
//! namespace of their own; virtiofsd runs as root inside its own sandbox (namespaces and
//! seccomp). Read from `/proc/<pid>/status` of every process of real QEMU/TCG guests.

use std::path::{Path, PathBuf};
use std::process::Command;

use podvisor_e2e::daemon::{e2e_can_run, processes_matching, TestDaemon};

/// What `/proc/<pid>/status` says about a process's confinement.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Confinement {
    /// Real, effective, saved and filesystem uid.
    uids: Vec<u32>,
    cap_eff: u64,
    /// 0 none, 1 strict, 2 filter.
    seccomp: u32,
    no_new_privs: u32,
    /// The mount namespace (`/proc/<pid>/ns/mnt`).
    mnt_ns: String,
}

fn confinement(pid: i32) -> Confinement {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .trim()
            .to_string()
    };
    Confinement {
        uids: field("Uid:").split_whitespace().map(|u| u.parse().unwrap()).collect(),
        cap_eff: u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        seccomp: field("Seccomp:").parse().unwrap(),
        no_new_privs: field("NoNewPrivs:").parse().unwrap(),
        mnt_ns: std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap().display().to_string(),
    }
}

/// A pod's VM processes, by kind: the command lines name the VM's run directory.
#[derive(Debug, Default)]
struct PodProcesses {
    qemu: Vec<i32>,
    vsock: Vec<i32>,
    console: Vec<i32>,
    virtiofsd: Vec<i32>,
}

fn pod_processes(run_dir: &Path) -> PodProcesses {
    let mut found = PodProcesses::default();
    for (pid, cmdline) in processes_matching(&run_dir.display().to_string()) {
        // The launcher has become its program by now: argv[0] is the program.
        let program = cmdline.split(' ').next().unwrap_or_default().to_string();
        let kind = if program.ends_with("qemu-system-x86_64") {
            &mut found.qemu
        } else if program.ends_with("vhost-device-vsock") {
            &mut found.vsock
        } else if cmdline.contains(" console-log ") {
            &mut found.console
        } else if program.ends_with("virtiofsd") {
            &mut found.virtiofsd
        } else {
            panic!("unexpected VM process {pid}: {cmdline}");
        };
        kind.push(pid);
    }
    found
}

fn run_dir(daemon: &TestDaemon, pod: &str) -> PathBuf {
    daemon.state().join("vms").join(&pod[..16])
}

/// QEMU and its two helpers: the pod's uid (all four ids), nothing effective, filtered,
/// `no_new_privs`, not in the daemon's mount namespace. Returns the uid.
fn assert_jailed(what: &str, pids: &[i32], own_mnt_ns: &str) -> u32 {
    assert_eq!(pids.len(), 1, "{what}: {pids:?}");
    let c = confinement(pids[0]);
    let uid = c.uids[0];
    assert!((100_000..165_536).contains(&uid), "{what} runs as uid {uid}: {c:?}");
    assert!(c.uids.iter().all(|&u| u == uid), "{what}: {c:?}");
    assert_eq!(c.cap_eff, 0, "{what} has capabilities: {c:?}");
    assert_eq!(c.seccomp, 2, "{what} has no seccomp filter: {c:?}");
    assert_eq!(c.no_new_privs, 1, "{what}: {c:?}");
    assert_ne!(c.mnt_ns, own_mnt_ns, "{what} shares the host's mount namespace");
    uid
}

/// virtiofsd: root (it serves files of every owner), in namespaces of its own (the shared
/// directory as its root); the process serving the guest keeps the capabilities file serving
/// needs and runs under seccomp with `no_new_privs`; its waiting parent has none.
fn assert_virtiofsd_sandboxed(pids: &[i32], own_mnt_ns: &str) {
    assert!(!pids.is_empty(), "no virtiofsd");
    let mut serving = 0;
    for &pid in pids {
        let c = confinement(pid);
        println!("virtiofsd {pid}: {c:?}");
        assert_eq!(c.uids[0], 0, "{c:?}");
        assert_ne!(c.mnt_ns, own_mnt_ns, "virtiofsd {pid} is in the host's mount namespace");
        if c.cap_eff != 0 {
            assert_eq!((c.seccomp, c.no_new_privs), (2, 1), "virtiofsd {pid}: {c:?}");
            // Nothing beyond what serving files takes (no CAP_SYS_ADMIN, CAP_NET_*, ...).
            assert_eq!(c.cap_eff & (1 << 21 | 1 << 12 | 1 << 13 | 1 << 19), 0, "{c:?}");
            serving += 1;
        }
    }
    assert!(serving > 0, "no virtiofsd serving: {pids:?}");
}

/// Runs `python3 -c script path` as `uid` (optionally inside the mount namespace of `pid`),
/// returning what it printed: the errno name of connecting to the unix socket `path`, or "OK".
fn try_connect_as(uid: u32, ns_of: Option<i32>, path: &Path) -> String {
    let script = "import socket, sys, errno\n\
                  s = socket.socket(socket.AF_UNIX)\n\
                  try:\n    s.connect(sys.argv[1]); print('OK')\n\
                  except OSError as e:\n    print(errno.errorcode[e.errno])\n";
    let mut cmd = match ns_of {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-m", "-S", &uid.to_string(), "-G", &uid.to_string()]);
            c.arg("/usr/bin/python3");
            c
        }
        None => {
            use std::os::unix::process::CommandExt;
            let mut c = Command::new("/usr/bin/python3");
            c.uid(uid).gid(uid);
            c
        }
    };
    let out = cmd.args(["-c", script]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// As `uid`: whether the directory `path` can be listed ("OK") or the errno name.
fn try_list_as(uid: u32, path: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let script = "import os, sys, errno\n\
                  try:\n    os.listdir(sys.argv[1]); print('OK')\n\
                  except OSError as e:\n    print(errno.errorcode[e.errno])\n";
    let out = Command::new("/usr/bin/python3")
        .uid(uid)
        .gid(uid)
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_qemu_vm_process_is_confined_and_pods_cannot_reach_each_other() {
    if !e2e_can_run() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: confinement needs the daemon to run as root");
        return;
    }
    let daemon = TestDaemon::start("hypervisor = \"qemu\"\n").await.unwrap();
    let log_dir = daemon.dir.path().join("logs");
    let ((a, _), (b, _)) =
        tokio::join!(daemon.run_pod("jail-a", &log_dir), daemon.run_pod("jail-b", &log_dir));
    let own_mnt_ns = std::fs::read_link("/proc/self/ns/mnt").unwrap().display().to_string();

    let mut uids = Vec::new();
    for pod in [&a, &b] {
        let dir = run_dir(&daemon, pod);
        let procs = pod_processes(&dir);
        println!("pod {pod}: {procs:?}");
        let uid = assert_jailed("qemu", &procs.qemu, &own_mnt_ns);
        assert_eq!(assert_jailed("vhost-device-vsock", &procs.vsock, &own_mnt_ns), uid);
        assert_eq!(assert_jailed("console-log", &procs.console, &own_mnt_ns), uid);
        assert_virtiofsd_sandboxed(&procs.virtiofsd, &own_mnt_ns);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&dir).unwrap().uid(), uid, "the run dir is the VM's");
        uids.push((uid, procs.qemu[0]));
    }
    let ((uid_a, qemu_a), (uid_b, _)) = (uids[0], uids[1]);
    assert_ne!(uid_a, uid_b, "two pods share a uid");

    // In pod A's jail, as its uid: its own vsock socket works; pod B's run directory and the
    // daemon's state (records, shares) are not there at all.
    let vsock_a = run_dir(&daemon, &a).join("vsock.sock");
    let vsock_b = run_dir(&daemon, &b).join("vsock.sock");
    assert_eq!(try_connect_as(uid_a, Some(qemu_a), &vsock_a), "OK");
    assert_eq!(try_connect_as(uid_a, Some(qemu_a), &vsock_b), "ENOENT");
    // On the host, as pod A's uid: pod B's sockets and shares are refused.
    assert_eq!(try_connect_as(uid_a, None, &vsock_b), "EACCES");
    assert_eq!(try_connect_as(uid_a, None, &run_dir(&daemon, &b).join("qmp.sock")), "EACCES");
    for share in ["share/shared", "volumes/shared"] {
        let path = daemon.state().join("sandboxes").join(&b).join(share);
        assert!(path.is_dir(), "{}", path.display());
        assert_eq!(try_list_as(uid_a, &path), "EACCES", "{}", path.display());
    }

    tokio::join!(daemon.remove_pod(&a), daemon.remove_pod(&b));
    daemon.assert_nothing_left();
}

/// Under TCG (what `auto` falls back to without usable KVM) Status says the VMs are no
/// security boundary, and `qemu.allow_tcg = false` refuses to start instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcg_is_reported_as_no_security_boundary_and_can_be_refused() {
    if !e2e_can_run() {
        return;
    }
    let daemon =
        TestDaemon::start("hypervisor = \"qemu\"\n[qemu]\naccel = \"tcg\"\n").await.unwrap();
    let status = daemon
        .runtime()
        .await
        .unwrap()
        .status(k8s_cri::v1::StatusRequest { verbose: true })
        .await
        .unwrap()
        .into_inner();
    let conditions = status.status.unwrap().conditions;
    let isolation = conditions.iter().find(|c| c.r#type == "VMIsolation").expect("VMIsolation");
    assert!(!isolation.status, "{isolation:?}");
    assert_eq!(isolation.reason, "TCGIsNotASecurityBoundary");
    assert!(status.info["hypervisorWarning"].contains("allow_tcg"), "{:?}", status.info);
    assert!(
        daemon.log_tail().contains("not treat as a security boundary"),
        "{}",
        daemon.log_tail()
    );
    drop(daemon);

    let refused =
        TestDaemon::start("hypervisor = \"qemu\"\n[qemu]\naccel = \"tcg\"\nallow_tcg = false\n")
            .await;
    let error = format!("{:#}", refused.err().expect("a daemon refusing TCG started"));
    assert!(error.contains("not a security boundary"), "{error}");
}
