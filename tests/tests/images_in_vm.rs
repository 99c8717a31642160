//! End-to-end: images pulled from a real registry run as containers inside a real guest, and
//! their root filesystems behave as OCI says (layers, whiteouts, users, writable layer,
//! read-only rootfs, multi-arch).

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, TestDaemon};
use podvisor_e2e::registry::TestRegistry;

struct Pod<'a> {
    daemon: &'a TestDaemon,
    id: String,
    config: cri::PodSandboxConfig,
}

impl Pod<'_> {
    async fn run(
        &self,
        name: &str,
        image: &str,
        tweak: impl FnOnce(&mut cri::ContainerConfig),
    ) -> String {
        let mut config = container_config(name, image, &["/bin/sh", "-c", "sleep 3600"]);
        tweak(&mut config);
        self.daemon.create_and_start(&self.id, &self.config, config).await
    }

    /// Runs `script` with sh in container `id`: (exit code, stdout, stderr).
    async fn sh(&self, id: &str, script: &str) -> (i32, String, String) {
        let out = self
            .daemon
            .exec(id, &["/bin/sh", "-c", script], 20)
            .await
            .unwrap_or_else(|e| panic!("exec {script}: {e}"));
        (
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn files_named(dir: &std::path::Path, name: &str, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if entry.file_name() == name {
            found.push(path.clone());
        }
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            files_named(&path, name, found);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_root_filesystems_in_a_vm() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let layered = registry.push_multilayer("layered:1").unwrap();
    let app_user = registry.push_with_user("appuser:1", "app").unwrap();
    let numeric_user = registry.push_with_user("numuser:1", "1234:1234").unwrap();
    let multiarch = registry.push_multiarch("multi:1").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    let mut images = daemon.images().await.unwrap();
    for image in [&layered, &app_user, &numeric_user, &multiarch] {
        daemon.pull(image).await;
    }
    let status = images
        .image_status(cri::ImageStatusRequest {
            image: Some(cri::ImageSpec { image: numeric_user.clone(), ..Default::default() }),
            verbose: false,
        })
        .await
        .unwrap()
        .into_inner()
        .image
        .unwrap();
    assert_eq!(status.uid.map(|u| u.value), Some(1234));

    let (id, config) = daemon.run_pod("images", &daemon.dir.path().join("logs")).await;
    let pod = Pod { daemon: &daemon, id: id.clone(), config };

    // Layers, whiteouts and opaque directories.
    let a = pod.run("layered-a", &layered, |_| {}).await;
    assert_ne!(pod.sh(&a, "test -e /etc/removed.txt").await.0, 0, "whited-out file is gone");
    assert_eq!(pod.sh(&a, "ls /data/old").await.1, "new.txt\n", "opaque dir hides the lower layer");
    assert_eq!(
        pod.sh(&a, "cat /data/old/new.txt /data/keep.txt /data/hardlink /data/link").await.1,
        "new\nkeep\nkeep\nkeep\n"
    );
    assert_eq!(pod.sh(&a, "stat -c %u:%g:%a /data/owned.txt").await.1, "1234:1234:600\n");

    // Writes land in the container's own layer: not in the image, not in a sibling.
    let (code, _, err) = pod
        .sh(
            &a,
            "echo changed > /data/keep.txt && echo new > /podvisor-written && rm /data/old/new.txt",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(pod.sh(&a, "cat /data/keep.txt /podvisor-written").await.1, "changed\nnew\n");
    let b = pod.run("layered-b", &layered, |_| {}).await;
    assert_eq!(pod.sh(&b, "cat /data/keep.txt /data/old/new.txt").await.1, "keep\nnew\n");
    assert_ne!(pod.sh(&b, "test -e /podvisor-written").await.0, 0);
    let mut on_host = Vec::new();
    files_named(&daemon.root(), "podvisor-written", &mut on_host);
    assert!(on_host.is_empty(), "a container write reached the host image store: {on_host:?}");

    // A read-only root filesystem refuses writes.
    let ro = pod
        .run("readonly", &layered, |c| {
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    readonly_rootfs: true,
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .await;
    let (code, _, err) = pod.sh(&ro, "touch /should-fail").await;
    assert_ne!(code, 0);
    assert!(err.to_lowercase().contains("read-only"), "{err}");
    assert_eq!(pod.sh(&ro, "cat /data/keep.txt").await.1, "keep\n");

    // The image's User: a name from its /etc/passwd, or numeric uid:gid.
    let named = pod.run("named-user", &app_user, |_| {}).await;
    assert_eq!(pod.sh(&named, "id -u; id -g").await.1, "1000\n1000\n");
    let numeric = pod.run("numeric-user", &numeric_user, |_| {}).await;
    assert_eq!(pod.sh(&numeric, "id -u; id -g").await.1, "1234\n1234\n");
    // The security context overrides it.
    let overridden = pod
        .run("run-as", &app_user, |c| {
            c.linux = Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    run_as_user: Some(cri::Int64Value { value: 4321 }),
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .await;
    assert_eq!(pod.sh(&overridden, "id -u").await.1, "4321\n");

    // CPU and memory limits reach the container's cgroup in the guest.
    let limited = pod
        .run("limited", &layered, |c| {
            c.linux = Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    memory_limit_in_bytes: 64 * 1024 * 1024,
                    cpu_quota: 50_000,
                    cpu_period: 100_000,
                    ..Default::default()
                }),
                ..Default::default()
            })
        })
        .await;
    assert_eq!(
        pod.sh(&limited, "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max").await.1,
        "67108864\n50000 100000\n"
    );

    // A multi-arch index runs its linux/amd64 image.
    let arch = pod.run("multiarch", &multiarch, |_| {}).await;
    assert_eq!(pod.sh(&arch, "cat /arch").await.1, "amd64\n");

    // An image that containers run from is not removed from under them (as CRI-O refuses).
    let in_use = images
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec { image: layered.clone(), ..Default::default() }),
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), tonic::Code::FailedPrecondition, "{in_use}");
    assert!(in_use.message().contains("in use by container"), "{in_use}");
    assert_eq!(pod.sh(&b, "cat /data/keep.txt").await.1, "keep\n");

    daemon.remove_pod(&id).await;
    // With the pod (and its containers) gone, it can go.
    images
        .remove_image(cri::RemoveImageRequest {
            image: Some(cri::ImageSpec { image: layered.clone(), ..Default::default() }),
        })
        .await
        .unwrap();
    daemon.assert_nothing_left();
}
