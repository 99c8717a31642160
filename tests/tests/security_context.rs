//! The security context inside a real guest (QEMU/TCG here), through the daemon's CRI socket:
//! one pod whose containers each run under a different context, checked from inside with
//! ExecSync (so the exec path is checked too) and from ContainerStatus.
//!
//! - run-as user, group and supplementary groups (Merge and Strict) as `id` shows them;
//! - a dropped capability makes its operation fail; dropping ALL works;
//! - RuntimeDefault blocks `unshare(CLONE_NEWUSER)`, which the kernel allows unconfined; a
//!   Localhost profile that blocks `sethostname` blocks it, and nothing else;
//! - a read-only rootfs; masked paths unreadable, read-only paths unwritable;
//! - a privileged container has every capability, the VM's devices and no filter;
//! - what cannot be honoured is refused with InvalidArgument naming it.

use std::collections::BTreeSet;
use std::path::Path;

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, TestDaemon};
use podvisor_e2e::images::{LayerBuilder, TestImage};
use podvisor_e2e::registry::TestRegistry;

const POD: &str = "secctx";
/// What the test image's /secret-token holds (masked in one container).
const TOKEN: &str = "s3cret\n";
/// The errno the Localhost profile answers `sethostname` with: not EPERM, so the refusal is
/// the filter's and not a missing capability's.
const EOPNOTSUPP: u32 = 95;

/// Busybox with a user `app` (1000:1000) who is also in `extra` (3000), and files to mask.
fn test_image() -> TestImage {
    let base = LayerBuilder::new().busybox_root().unwrap().finish().unwrap();
    let extra = LayerBuilder::new()
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n\
              nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
            0o644,
        )
        .unwrap()
        .file("etc/group", b"root:x:0:\napp:x:1000:\nextra:x:3000:app\nnogroup:x:65534:\n", 0o644)
        .unwrap()
        .file("secret-token", TOKEN.as_bytes(), 0o644)
        .unwrap()
        .dir("secret-dir", 0o755)
        .unwrap()
        .file("secret-dir/key", b"key\n", 0o644)
        .unwrap()
        .dir("data-ro", 0o777)
        .unwrap()
        .finish()
        .unwrap();
    TestImage::new(vec![base, extra])
}

fn security(sc: cri::LinuxContainerSecurityContext) -> Option<cri::LinuxContainerConfig> {
    Some(cri::LinuxContainerConfig { resources: None, security_context: Some(sc) })
}

fn id(value: i64) -> Option<cri::Int64Value> {
    Some(cri::Int64Value { value })
}

fn caps(add: &[&str], drop: &[&str]) -> Option<cri::Capability> {
    Some(cri::Capability {
        add_capabilities: add.iter().map(|s| s.to_string()).collect(),
        drop_capabilities: drop.iter().map(|s| s.to_string()).collect(),
        add_ambient_capabilities: Vec::new(),
    })
}

fn seccomp(kind: cri::security_profile::ProfileType, path: &str) -> Option<cri::SecurityProfile> {
    Some(cri::SecurityProfile { profile_type: kind as i32, localhost_ref: path.into() })
}

/// The pod, its image and the daemon, for the checks below.
struct Pod<'a> {
    daemon: &'a TestDaemon,
    id: String,
    config: cri::PodSandboxConfig,
    image: String,
}

impl Pod<'_> {
    /// A running container of `sleep 3600` under `sc`.
    async fn start(&self, name: &str, sc: cri::LinuxContainerSecurityContext) -> String {
        let mut config = container_config(name, &self.image, &["sleep", "3600"]);
        config.linux = security(sc);
        self.daemon.create_and_start(&self.id, &self.config, config).await
    }

    /// CreateContainer's refusal of `sc`.
    async fn refusal(&self, sc: cri::LinuxContainerSecurityContext) -> tonic::Status {
        let mut config = container_config("refused", &self.image, &["sleep", "3600"]);
        config.linux = security(sc);
        let mut rt = self.daemon.runtime().await.unwrap();
        rt.create_container(cri::CreateContainerRequest {
            pod_sandbox_id: self.id.clone(),
            config: Some(config),
            sandbox_config: Some(self.config.clone()),
        })
        .await
        .expect_err("CreateContainer should have been refused")
    }

    /// ExecSync of `sh -c script`: (exit code, stdout, stderr).
    async fn sh(&self, container: &str, script: &str) -> (i32, String, String) {
        let out = self
            .daemon
            .exec(container, &["sh", "-c", script], 60)
            .await
            .unwrap_or_else(|e| panic!("exec {script:?}: {e}\n{}", self.daemon.log_tail()));
        (
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// stdout of a script that must succeed.
    async fn ok(&self, container: &str, script: &str) -> String {
        let (code, out, err) = self.sh(container, script).await;
        assert_eq!(code, 0, "{script:?} failed in {container}: {err}");
        out
    }

    /// stderr of a script that must fail.
    async fn fails(&self, container: &str, script: &str) -> String {
        let (code, out, err) = self.sh(container, script).await;
        assert_ne!(code, 0, "{script:?} succeeded in {container}: {out}");
        err
    }

    /// (uid, gid, all groups) as `id` shows them.
    async fn identity(&self, container: &str) -> (String, String, BTreeSet<String>) {
        let out = self.ok(container, "id -u; id -g; id -G").await;
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out:?}");
        (
            lines[0].to_string(),
            lines[1].to_string(),
            lines[2].split_whitespace().map(String::from).collect(),
        )
    }

    /// The `name:` line of /proc/self/status, its value.
    async fn status_field(&self, container: &str, name: &str) -> String {
        let out = self.ok(container, &format!("grep '^{name}:' /proc/self/status")).await;
        out.split_once(':').map(|(_, v)| v.trim().to_string()).unwrap_or_default()
    }

    async fn user_in_status(&self, container: &str) -> cri::LinuxContainerUser {
        let status = self.daemon.container_status(container).await;
        status.user.and_then(|u| u.linux).expect("ContainerStatus has no user")
    }
}

fn groups(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_context_in_the_guest() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_image("secctx:1", &test_image()).unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let status = daemon
        .runtime()
        .await
        .unwrap()
        .status(cri::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    assert!(status.features.unwrap().supplemental_groups_policy);

    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod_id, config) = daemon.run_pod(POD, &log_dir).await;
    let pod = Pod { daemon: &daemon, id: pod_id, config, image };

    users_and_groups(&pod).await;
    capabilities(&pod).await;
    seccomp_profiles(&pod, daemon.dir.path()).await;
    filesystems(&pod).await;
    privileged(&pod).await;
    refusals(&pod, daemon.dir.path()).await;

    daemon.remove_pod(&pod.id).await;
    daemon.assert_nothing_left();
}

async fn users_and_groups(pod: &Pod<'_>) {
    let merge = cri::LinuxContainerSecurityContext {
        run_as_user: id(1000),
        run_as_group: id(2000),
        supplemental_groups: vec![4000],
        ..Default::default()
    };
    let strict = cri::LinuxContainerSecurityContext {
        supplemental_groups_policy: cri::SupplementalGroupsPolicy::Strict as i32,
        ..merge.clone()
    };
    let by_name =
        cri::LinuxContainerSecurityContext { run_as_username: "app".into(), ..Default::default() };
    let merged = pod.start("merge", merge).await;
    let strict = pod.start("strict", strict).await;
    let by_name = pod.start("by-name", by_name).await;

    // Merge: the image's `extra` (3000) joins the requested 4000; Strict: only 4000.
    let (uid, gid, all) = pod.identity(&merged).await;
    assert_eq!(
        (uid.as_str(), gid.as_str(), all),
        ("1000", "2000", groups(&["2000", "3000", "4000"]))
    );
    let (uid, gid, all) = pod.identity(&strict).await;
    assert_eq!((uid.as_str(), gid.as_str(), all), ("1000", "2000", groups(&["2000", "4000"])));
    let (uid, gid, all) = pod.identity(&by_name).await;
    assert_eq!((uid.as_str(), gid.as_str(), all), ("1000", "1000", groups(&["1000", "3000"])));

    // ContainerStatus reports the same identity (the SupplementalGroupsPolicy feature).
    let user = pod.user_in_status(&merged).await;
    assert_eq!(
        (user.uid, user.gid, user.supplemental_groups),
        (1000, 2000, vec![2000, 3000, 4000])
    );
    let user = pod.user_in_status(&strict).await;
    assert_eq!((user.uid, user.gid, user.supplemental_groups), (1000, 2000, vec![2000, 4000]));
}

async fn capabilities(pod: &Pod<'_>) {
    let plain = pod.start("plain", Default::default()).await;
    let no_chown = pod
        .start(
            "no-chown",
            cri::LinuxContainerSecurityContext {
                capabilities: caps(&[], &["CHOWN"]),
                ..Default::default()
            },
        )
        .await;
    let none = pod
        .start(
            "no-caps",
            cri::LinuxContainerSecurityContext {
                capabilities: caps(&[], &["ALL"]),
                ..Default::default()
            },
        )
        .await;
    let chown = "touch /tmp/f && chown 1234 /tmp/f";
    pod.ok(&plain, chown).await;
    let err = pod.fails(&no_chown, chown).await;
    assert!(err.contains("Operation not permitted"), "{err}");
    // Every set is empty, and what needs a capability fails (a root process without them).
    for set in ["CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb"] {
        assert_eq!(pod.status_field(&none, set).await, "0000000000000000", "{set}");
    }
    let err = pod.fails(&none, chown).await;
    assert!(err.contains("Operation not permitted"), "{err}");
    assert_ne!(pod.status_field(&plain, "CapEff").await, "0000000000000000");
}

async fn seccomp_profiles(pod: &Pod<'_>, dir: &Path) {
    use cri::security_profile::ProfileType;
    let profile = dir.join("no-sethostname.json");
    std::fs::write(
        &profile,
        serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO",
                          "errnoRet": EOPNOTSUPP}]
        })
        .to_string(),
    )
    .unwrap();
    let confined = pod
        .start(
            "runtime-default",
            cri::LinuxContainerSecurityContext {
                seccomp: seccomp(ProfileType::RuntimeDefault, ""),
                ..Default::default()
            },
        )
        .await;
    let unconfined = pod
        .start(
            "unconfined",
            cri::LinuxContainerSecurityContext {
                seccomp: seccomp(ProfileType::Unconfined, ""),
                capabilities: caps(&["SYS_ADMIN"], &[]),
                ..Default::default()
            },
        )
        .await;
    let localhost = pod
        .start(
            "localhost",
            cri::LinuxContainerSecurityContext {
                seccomp: seccomp(ProfileType::Localhost, &profile.display().to_string()),
                capabilities: caps(&["SYS_ADMIN"], &[]),
                ..Default::default()
            },
        )
        .await;

    // A new user namespace needs no capability: only the filter stands in the way.
    let new_userns = "unshare -U true";
    pod.ok(&unconfined, new_userns).await;
    let err = pod.fails(&confined, new_userns).await;
    assert!(err.contains("Operation not permitted"), "{err}");
    // The filter is on the exec'd process, and it still runs ordinary programs (fork, pipes),
    // with the container's rlimits.
    assert_eq!(pod.status_field(&confined, "Seccomp").await, "2");
    assert_eq!(pod.status_field(&unconfined, "Seccomp").await, "0");
    assert_eq!(pod.ok(&confined, "echo piped | cat; ulimit -n").await, "piped\n1048576\n");

    // The Localhost profile blocks sethostname (with its own errno) and nothing else.
    let same_name = format!("hostname {POD}");
    pod.ok(&unconfined, &same_name).await;
    let err = pod.fails(&localhost, &same_name).await;
    assert!(err.contains("not supported"), "{err}");
    pod.ok(&localhost, new_userns).await;
    assert_eq!(pod.ok(&localhost, "hostname").await.trim(), POD);
}

async fn filesystems(pod: &Pod<'_>) {
    let read_only = pod
        .start(
            "read-only",
            cri::LinuxContainerSecurityContext { readonly_rootfs: true, ..Default::default() },
        )
        .await;
    let masked = pod
        .start(
            "masked",
            cri::LinuxContainerSecurityContext {
                masked_paths: vec!["/secret-token".into(), "/secret-dir".into()],
                readonly_paths: vec!["/data-ro".into()],
                no_new_privs: true,
                ..Default::default()
            },
        )
        .await;

    let err = pod.fails(&read_only, "touch /new-file").await;
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(pod.ok(&read_only, "cat /secret-token").await, TOKEN);
    // The pod's files are mounted over the read-only root, as kubelet's are.
    assert_eq!(pod.ok(&read_only, "cat /etc/hostname").await.trim(), POD);

    assert_eq!(pod.ok(&masked, "cat /secret-token").await, "");
    assert_eq!(pod.ok(&masked, "ls -A /secret-dir").await, "");
    let err = pod.fails(&masked, "touch /data-ro/x").await;
    assert!(err.contains("Read-only file system"), "{err}");
    pod.ok(&masked, "touch /elsewhere").await;
    assert_eq!(pod.status_field(&masked, "NoNewPrivs").await, "1");
}

async fn privileged(pod: &Pod<'_>) {
    let privileged = pod
        .start(
            "privileged",
            cri::LinuxContainerSecurityContext {
                privileged: true,
                seccomp: seccomp(cri::security_profile::ProfileType::RuntimeDefault, ""),
                ..Default::default()
            },
        )
        .await;
    // Every capability the guest kernel knows (41 on Linux 6.1), and no filter.
    assert_eq!(pod.status_field(&privileged, "CapEff").await, "000001ffffffffff");
    assert_eq!(pod.status_field(&privileged, "Seccomp").await, "0");
    // The VM's devices: the guest's kernel log device is there, in no other container.
    pod.ok(&privileged, "test -c /dev/kmsg").await;
    let plain = pod.start("plain-devices", Default::default()).await;
    pod.fails(&plain, "test -e /dev/kmsg").await;
    pod.ok(&privileged, "mount -t tmpfs none /tmp && touch /tmp/x && umount /tmp").await;
}

async fn refusals(pod: &Pod<'_>, dir: &Path) {
    use cri::security_profile::ProfileType;
    let malformed = dir.join("malformed.json");
    std::fs::write(&malformed, "{\"defaultAction\": ").unwrap();
    let localhost = |path: &Path| cri::LinuxContainerSecurityContext {
        seccomp: seccomp(ProfileType::Localhost, &path.display().to_string()),
        ..Default::default()
    };
    let cases = [
        (
            cri::LinuxContainerSecurityContext { run_as_group: id(2000), ..Default::default() },
            "run_as_group",
        ),
        (localhost(&dir.join("missing.json")), "missing.json"),
        (localhost(&malformed), "malformed.json"),
        (localhost(Path::new("relative.json")), "localhost_ref"),
        (
            cri::LinuxContainerSecurityContext {
                capabilities: caps(&["FLY"], &[]),
                ..Default::default()
            },
            "FLY",
        ),
    ];
    for (sc, named) in cases {
        let err = pod.refusal(sc).await;
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(named), "{named}: {err:?}");
    }
}
