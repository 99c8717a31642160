//! User namespaces (userns_options POD) on real guests (QEMU/TCG here), one pod for all the
//! checks (and a second pod sharing a PID namespace): the mapping every process of the pod sees, root inside, a writable rootfs and pod
//! files, host files' owners translated both ways through the volume share, the mapping kept
//! across a daemon restart; and the refusals: CONTAINER/TARGET, bad mappings, a host
//! namespace beside a user namespace, the host handler. Status advertises what each handler
//! honours.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, guest_agent, pod_config, TestDaemon};
use podvisor_e2e::registry::TestRegistry;
use podvisor_e2e::streaming::{Channels, RemoteCommand};

/// kubelet's pick for a pod: one range of 65536 ids, container 0 at a multiple of 65536.
const HOST_BASE: u32 = 131_072;
const LENGTH: u32 = 65_536;

fn with_userns(
    mut config: cri::PodSandboxConfig,
    userns: cri::UserNamespace,
) -> cri::PodSandboxConfig {
    let linux = config.linux.get_or_insert_with(Default::default);
    let sc = linux.security_context.get_or_insert_with(Default::default);
    let ns = sc.namespace_options.get_or_insert_with(Default::default);
    ns.pid = cri::NamespaceMode::Container as i32;
    ns.userns_options = Some(userns);
    config
}

fn pod_mode(uids: &[(u32, u32, u32)]) -> cri::UserNamespace {
    let maps: Vec<cri::IdMapping> = uids
        .iter()
        .map(|&(container_id, host_id, length)| cri::IdMapping { container_id, host_id, length })
        .collect();
    cri::UserNamespace { mode: cri::NamespaceMode::Pod as i32, uids: maps.clone(), gids: maps }
}

/// Runs `sh -c script` in `cid`: (exit code, stdout + stderr).
async fn sh(daemon: &TestDaemon, cid: &str, script: &str) -> (i32, String) {
    let out = daemon.exec(cid, &["sh", "-c", script], 30).await.unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.exit_code, text)
}

async fn ok(daemon: &TestDaemon, cid: &str, script: &str) -> String {
    let (code, out) = sh(daemon, cid, script).await;
    assert_eq!(code, 0, "{script}: {out}\n{}", daemon.log_tail());
    out
}

/// The mapping `cat /proc/self/uid_map /proc/self/gid_map` printed, as fields.
fn map_lines(text: &str) -> Vec<Vec<String>> {
    text.lines().map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

async fn assert_refused(
    daemon: &TestDaemon,
    config: &cri::PodSandboxConfig,
    handler: &str,
    want: &str,
) {
    let err = daemon.run_pod_sandbox(config, handler).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{want}: {err:?}");
    assert!(err.message().contains(want), "{want}: {err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_with_a_user_namespace_maps_its_root_to_the_requested_range() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:userns").unwrap();
    let host_handler =
        format!("[host]\nagent = {:?}\n[runtimes.host]\nhypervisor = \"host\"\n", guest_agent());
    let mut daemon = TestDaemon::start(&host_handler).await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");
    let pod_cfg = with_userns(pod_config("userns", &log_dir), pod_mode(&[(0, HOST_BASE, LENGTH)]));

    // Status: every VM handler makes user namespaces; the host handler does not.
    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    let features: Vec<(String, bool)> = status
        .runtime_handlers
        .iter()
        .map(|h| (h.name.clone(), h.features.as_ref().is_some_and(|f| f.user_namespaces)))
        .collect();
    assert_eq!(features, [(String::new(), true), ("host".to_string(), false)]);

    // Refusals, before any VM is made.
    let field = "namespace_options.userns_options";
    for (mode, name) in
        [(cri::NamespaceMode::Container, "CONTAINER"), (cri::NamespaceMode::Target, "TARGET")]
    {
        let mut options = pod_mode(&[(0, HOST_BASE, LENGTH)]);
        options.mode = mode as i32;
        let bad = with_userns(pod_config("userns", &log_dir), options);
        assert_refused(&daemon, &bad, "", &format!("{field}.mode: {name}")).await;
    }
    for (maps, want) in [
        (vec![(0, HOST_BASE, 0)], "uids[0].length"),
        (vec![(0, HOST_BASE, 10), (5, 1_000_000, 10)], "uids[1]: overlaps uids[0]"),
        (vec![(0, u32::MAX - 10, LENGTH)], "uids[0]: container_id/host_id + length"),
        (vec![(1, HOST_BASE, LENGTH)], "uids: container id 0 (root) must be mapped"),
    ] {
        let bad = with_userns(pod_config("userns", &log_dir), pod_mode(&maps));
        assert_refused(&daemon, &bad, "", &format!("{field}.{want}")).await;
    }
    let mut host_network = pod_cfg.clone();
    let ns = host_network.linux.as_mut().unwrap().security_context.as_mut().unwrap();
    ns.namespace_options.as_mut().unwrap().network = cri::NamespaceMode::Node as i32;
    assert_refused(&daemon, &host_network, "", "namespace_options.network: NODE").await;
    assert_refused(
        &daemon,
        &pod_cfg,
        "host",
        "userns_options: POD mode is not supported by the host handler",
    )
    .await;

    let pod = daemon
        .run_pod_sandbox(&pod_cfg, "")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", daemon.log_tail()));
    // kubelet makes volumes as the host's root; the host's ids past the mapping's host side
    // (here: the guest range itself) are nobody's in the container.
    let volume_dir = tempfile::tempdir().unwrap();
    let shared = volume_dir.path().join("data");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("from-host"), "host\n").unwrap();
    std::fs::write(shared.join("guest-range"), "x\n").unwrap();
    nix::unistd::chown(&shared.join("guest-range"), Some(HOST_BASE.into()), Some(HOST_BASE.into()))
        .unwrap();
    let mut app = container_config("app", &image, &["sleep", "3600"]);
    app.mounts = vec![cri::Mount {
        container_path: "/data".into(),
        host_path: shared.display().to_string(),
        ..Default::default()
    }];
    let app = daemon.create_and_start(&pod, &pod_cfg, app).await;

    // The exec'd process is in the pod's user namespace, root inside, HOST_BASE outside.
    let want = vec![vec!["0".to_string(), HOST_BASE.to_string(), LENGTH.to_string()]; 2];
    let maps = ok(&daemon, &app, "cat /proc/self/uid_map /proc/self/gid_map").await;
    assert_eq!(map_lines(&maps), want, "{maps}");
    assert_eq!(ok(&daemon, &app, "id -u; id -g").await, "0\n0\n");
    // ... and in the container's cgroup (the root of its cgroup namespace).
    assert_eq!(ok(&daemon, &app, "cat /proc/self/cgroup").await, "0::/\n");
    // A terminal exec too (libcontainer hands the PTY over a console socket of the agent's).
    let tty = Channels { stdin: false, stdout: true, stderr: false, tty: true };
    let url = rt
        .exec(cri::ExecRequest {
            container_id: app.clone(),
            cmd: vec!["sh".into(), "-c".into(), "tty >/dev/null && cat /proc/self/uid_map".into()],
            tty: true,
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let done = RemoteCommand::connect(&url, tty)
        .await
        .unwrap()
        .finish(std::time::Duration::from_secs(60))
        .await
        .unwrap();
    let seen = String::from_utf8_lossy(&done.stdout).replace('\r', "");
    assert_eq!(map_lines(&seen), want[..1], "{seen} status {}", done.status);
    assert_eq!(done.exit_code(), Some(0), "status {}", done.status);
    // So is the container's own process (pid 1 of its PID namespace).
    let init = ok(&daemon, &app, "cat /proc/1/uid_map; grep -E '^(Uid|Gid):' /proc/1/status").await;
    assert_eq!(map_lines(&init)[0], want[0], "{init}");
    assert!(init.contains("Uid:\t0\t0\t0\t0") && init.contains("Gid:\t0\t0\t0\t0"), "{init}");

    // The image's files are root's in the container: root writes its rootfs and /etc; the
    // pod's hosts file is its root's too.
    ok(&daemon, &app, "stat -c '%u:%g' /etc/passwd /bin | sort -u | grep -x 0:0").await;
    ok(&daemon, &app, "echo mine > /owned && cat /owned && echo x >> /etc/passwd && touch /tmp/t")
        .await;
    ok(&daemon, &app, "stat -c %u /etc/hosts | grep -x 0 && echo '10.9.9.9 extra' >> /etc/hosts")
        .await;

    // The volume: the host's root is the container's root both ways, other ids keep their
    // number, and host ids in the guest range are nobody.
    let owners =
        ok(&daemon, &app, "stat -c '%n %u:%g' /data /data/from-host /data/guest-range").await;
    assert_eq!(owners, "/data 0:0\n/data/from-host 0:0\n/data/guest-range 65534:65534\n");
    ok(
        &daemon,
        &app,
        "echo back > /data/from-container && touch /data/as-1000 && chown 1000:1000 /data/as-1000",
    )
    .await;
    ok(&daemon, &app, "cat /data/from-host | grep -x host").await;
    let owner = |name: &str| {
        let m = std::fs::metadata(shared.join(name)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(owner("from-container"), (0, 0));
    assert_eq!(owner("as-1000"), (1000, 1000));
    assert_eq!(std::fs::read_to_string(shared.join("from-container")).unwrap(), "back\n");
    // A mode the host set is the container's to change (it owns the file).
    std::fs::set_permissions(shared.join("from-host"), std::fs::Permissions::from_mode(0o600))
        .unwrap();
    ok(&daemon, &app, "chmod 644 /data/from-host && echo more >> /data/from-host").await;

    // After a daemon restart the pod keeps its mapping: a new container gets it too.
    daemon.restart().await.unwrap();
    let later = container_config("later", &image, &["sleep", "3600"]);
    let later = daemon.create_and_start(&pod, &pod_cfg, later).await;
    let maps = ok(&daemon, &later, "cat /proc/self/uid_map /proc/self/gid_map").await;
    assert_eq!(map_lines(&maps), want, "{maps}");
    assert_eq!(
        ok(&daemon, &later, "cat /owned 2>&1; id -u").await,
        "cat: can't open '/owned': No such file or directory\n0\n"
    );

    daemon.remove_pod(&pod).await;

    // critest's pod: namespace options with nothing but the user namespace, so the pod shares
    // a PID namespace (POD), whose PID 1 (the pause process) is made in the pod's user
    // namespace and runs as its root; two containers see each other.
    let mut shared_cfg = pod_config("userns-shared-pid", &log_dir);
    shared_cfg.linux = Some(cri::LinuxPodSandboxConfig {
        security_context: Some(cri::LinuxSandboxSecurityContext {
            namespace_options: Some(cri::NamespaceOption {
                userns_options: Some(pod_mode(&[(0, HOST_BASE, LENGTH)])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let shared = daemon
        .run_pod_sandbox(&shared_cfg, "")
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", daemon.log_tail()));
    let first = container_config("first", &image, &["sleep", "3601"]);
    let first = daemon.create_and_start(&shared, &shared_cfg, first).await;
    let second = container_config("second", &image, &["sleep", "3602"]);
    let second = daemon.create_and_start(&shared, &shared_cfg, second).await;
    for cid in [&first, &second] {
        let maps = ok(&daemon, cid, "cat /proc/self/uid_map /proc/self/gid_map").await;
        assert_eq!(map_lines(&maps), want, "{maps}");
    }
    let pid1 = ok(&daemon, &second, "cat /proc/1/comm; grep -E '^Uid:' /proc/1/status").await;
    assert_eq!(pid1, "pause\nUid:\t0\t0\t0\t0\n");
    let seen = ok(&daemon, &second, "ps -o args").await;
    assert!(seen.contains("sleep 3601") && seen.contains("sleep 3602"), "{seen}");
    ok(&daemon, &first, "echo shared > /tmp/t && id -u | grep -x 0").await;

    daemon.remove_pod(&shared).await;
    daemon.assert_nothing_left();
}
