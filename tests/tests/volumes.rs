//! Volumes on real guests (QEMU/TCG here), one pod for all the checks: read-write both ways,
//! read-only, a configMap-style `..data` symlink swap, a single file, a host path that is a
//! symlink, symlinks inside a volume that point outside it, `ro` versus `rro` over a host
//! submount, rslave and rshared propagation, a privileged container making a bridge, and
//! image volumes (kubelet's ImageVolume: `Mount.image`, `image_sub_path`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_cri::v1 as cri;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use podvisor_e2e::daemon::{container_config, e2e_can_run, wait_for, TestDaemon};
use podvisor_e2e::images::{LayerBuilder, TestImage};
use podvisor_e2e::registry::TestRegistry;
use prost::Message;

/// Host-side volume directories, with the mounts the test makes in them undone on drop
/// (kubelet's /var/lib/kubelet is such a shared mount).
struct HostVolumes {
    dir: tempfile::TempDir,
    mounts: Vec<PathBuf>,
    /// Files made outside `dir` (the host secret the guest must not reach).
    outside: Vec<PathBuf>,
}

impl HostVolumes {
    fn new() -> Self {
        Self { dir: tempfile::tempdir().unwrap(), mounts: Vec::new(), outside: Vec::new() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn make_dir(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Makes `dir` a shared mount of its own, as runc needs of rslave and rshared sources.
    fn make_shared(&mut self, dir: &Path) {
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
        self.mounts.push(dir.to_path_buf());
        for flag in [MsFlags::MS_PRIVATE, MsFlags::MS_SHARED] {
            mount(None::<&str>, dir, None::<&str>, flag, None::<&str>).unwrap();
        }
    }

    fn mount_tmpfs(&mut self, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        mount(Some("tmpfs"), at, Some("tmpfs"), MsFlags::empty(), None::<&str>).unwrap();
        self.mounts.push(at.to_path_buf());
    }
}

impl Drop for HostVolumes {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = umount2(m, MntFlags::MNT_DETACH);
        }
        for f in &self.outside {
            let _ = std::fs::remove_file(f);
        }
    }
}

fn volume(host: &Path, container_path: &str, readonly: bool) -> cri::Mount {
    cri::Mount {
        container_path: container_path.into(),
        host_path: host.display().to_string(),
        readonly,
        ..Default::default()
    }
}

fn with_propagation(mut m: cri::Mount, p: cri::MountPropagation) -> cri::Mount {
    m.propagation = p as i32;
    m
}

/// Runs `sh -c script` in `cid`: (exit code, stdout, stderr).
async fn sh(daemon: &TestDaemon, cid: &str, script: &str) -> (i32, String, String) {
    let out = daemon.exec(cid, &["sh", "-c", script], 30).await.unwrap();
    (
        out.exit_code,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn ok(daemon: &TestDaemon, cid: &str, script: &str) -> String {
    let (code, out, err) = sh(daemon, cid, script).await;
    assert_eq!(code, 0, "{script}: {out}{err}");
    out
}

async fn fails(daemon: &TestDaemon, cid: &str, script: &str) -> String {
    let (code, out, err) = sh(daemon, cid, script).await;
    assert_ne!(code, 0, "{script} succeeded: {out}");
    err
}

/// Waits up to 5 s for `cat path` in the container to print `want`.
async fn eventually_reads(daemon: &TestDaemon, cid: &str, path: &str, want: &str) {
    let seen = wait_for(Duration::from_secs(5), || async {
        let (_, out, _) = sh(daemon, cid, &format!("cat {path}")).await;
        (out == want).then_some(())
    })
    .await;
    let (_, now, err) = sh(daemon, cid, &format!("cat {path}")).await;
    assert!(seen.is_some(), "{path}: wanted {want:?}, still {now:?} {err}");
}

/// The kubelet AtomicWriter layout: `..<ts>/key`, `..data -> ..<ts>`, `key -> ..data/key`.
fn write_config_map_version(dir: &Path, ts: &str, value: &str) {
    let version = dir.join(ts);
    std::fs::create_dir_all(&version).unwrap();
    std::fs::write(version.join("key"), value).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(ts, &tmp).unwrap();
    // The swap is a rename over the old link: atomic, as kubelet does it.
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("key").exists() {
        std::os::unix::fs::symlink("..data/key", dir.join("key")).unwrap();
    }
}

/// CRI v1.33's `Mount` as kubelet sends an image volume, with `image_sub_path` (field 10),
/// which k8s-cri 0.11's `Mount` lacks.
#[derive(Clone, PartialEq, prost::Message)]
struct ImageMount {
    #[prost(string, tag = "1")]
    container_path: String,
    #[prost(bool, tag = "3")]
    readonly: bool,
    #[prost(message, optional, tag = "9")]
    image: Option<cri::ImageSpec>,
    #[prost(string, tag = "10")]
    image_sub_path: String,
}

/// The mounts of a `ContainerConfig` (field 7), as the new `Mount`s.
#[derive(Clone, PartialEq, prost::Message)]
struct ConfigMounts {
    #[prost(message, repeated, tag = "7")]
    mounts: Vec<ImageMount>,
}

/// `CreateContainerRequest` whose config is encoded by hand (k8s-cri's, plus [`ConfigMounts`]).
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreateContainerRequest {
    #[prost(string, tag = "1")]
    pod_sandbox_id: String,
    #[prost(bytes = "vec", tag = "2")]
    config: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    sandbox_config: Option<cri::PodSandboxConfig>,
}

fn image_mount(container_path: &str, image: &str, sub_path: &str) -> ImageMount {
    ImageMount {
        container_path: container_path.into(),
        readonly: true,
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        image_sub_path: sub_path.into(),
    }
}

/// CreateContainer (+ StartContainer when it succeeds) of `config` with image volumes
/// `mounts`, as a CRI v1.33 client sends them.
async fn create_with_image_mounts(
    daemon: &TestDaemon,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    config: cri::ContainerConfig,
    mounts: Vec<ImageMount>,
) -> Result<String, tonic::Status> {
    let mut encoded = config.encode_to_vec();
    encoded.extend(ConfigMounts { mounts }.encode_to_vec());
    let request = RawCreateContainerRequest {
        pod_sandbox_id: pod.into(),
        config: encoded,
        sandbox_config: Some(pod_cfg.clone()),
    };
    let channel = podvisor_e2e::daemon::cri_channel(&daemon.socket()).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/runtime.v1.RuntimeService/CreateContainer");
    let id = grpc
        .unary::<_, cri::CreateContainerResponse, _>(
            tonic::Request::new(request),
            path,
            tonic_prost::ProstCodec::default(),
        )
        .await?
        .into_inner()
        .container_id;
    let mut rt = daemon.runtime().await.unwrap();
    rt.start_container(cri::StartContainerRequest { container_id: id.clone() }).await?;
    Ok(id)
}

/// Image B for image volumes: a data tree with a sub directory and links leading out of it.
fn data_image() -> TestImage {
    let layer = LayerBuilder::new()
        .dir("data", 0o755)
        .and_then(|l| l.file("data/hello", b"from image B\n", 0o644))
        .and_then(|l| l.dir("data/sub", 0o755))
        .and_then(|l| l.file("data/sub/inner", b"inner\n", 0o644))
        .and_then(|l| l.file("data/setuid", b"#!/bin/sh\nid -u\n", 0o4755))
        .and_then(|l| l.symlink("up", "../../../../../.."))
        .and_then(|l| l.symlink("abs", "/etc"))
        .and_then(|l| l.finish())
        .unwrap();
    TestImage::new(vec![layer])
}

/// Image volumes in the volumes pod: image B's tree at /img read-only (also nosuid, nodev)
/// in a container of image A, a sub directory of it, escaping sub paths and an image not
/// pulled refused, and RemoveImage of B refused while the container uses it.
async fn check_image_volumes(
    daemon: &TestDaemon,
    registry: &TestRegistry,
    pod: &str,
    pod_cfg: &cri::PodSandboxConfig,
    image_a: &str,
) {
    let image_b = registry.push_image("imgvol:data", &data_image()).unwrap();
    // kubelet pulls the image and names it by the pull's image_ref.
    let b_ref = daemon.pull(&image_b).await;
    let config = || container_config("imgvol", image_a, &["sleep", "3600"]);
    let mounts = vec![image_mount("/img", &b_ref, ""), image_mount("/sub", &b_ref, "data/sub")];
    let cid = create_with_image_mounts(daemon, pod, pod_cfg, config(), mounts)
        .await
        .unwrap_or_else(|e| panic!("image volumes: {e}\n{}", daemon.log_tail()));
    assert_eq!(ok(daemon, &cid, "cat /img/data/hello").await, "from image B\n");
    assert_eq!(ok(daemon, &cid, "cat /sub/inner").await, "inner\n");
    ok(daemon, &cid, "test ! -e /sub/hello").await;
    for write in ["touch /img/new", "echo x > /img/data/hello", "mkdir /sub/d"] {
        let err = fails(daemon, &cid, write).await;
        assert!(err.contains("Read-only file system"), "{write}: {err}");
    }
    let line = ok(daemon, &cid, "grep ' /img ' /proc/mounts").await;
    for option in ["ro", "nosuid", "nodev"] {
        assert!(line.split([' ', ',']).any(|o| o == option), "{option} missing: {line}");
    }
    let status = daemon.container_status(&cid).await;
    let img = status.mounts.iter().find(|m| m.container_path == "/img").unwrap();
    assert_eq!(img.image.as_ref().map(|i| i.image.as_str()), Some(b_ref.as_str()));
    assert!(img.readonly && img.host_path.is_empty());

    // An image in use by an image volume is refused for removal, and the volume keeps working.
    let mut images = daemon.images().await.unwrap();
    let remove = cri::RemoveImageRequest {
        image: Some(cri::ImageSpec { image: b_ref.clone(), ..Default::default() }),
    };
    let err = images.remove_image(remove.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert_eq!(ok(daemon, &cid, "cat /img/data/hello").await, "from image B\n");

    // Sub paths must stay inside the image, and be directories.
    for (n, sub_path) in
        ["up", "abs", "up/etc", "../data", "missing", "data/hello"].iter().enumerate()
    {
        let mut refused = config();
        refused.metadata.as_mut().unwrap().attempt = n as u32 + 1;
        let mounts = vec![image_mount("/sub", &b_ref, sub_path)];
        let err =
            create_with_image_mounts(daemon, pod, pod_cfg, refused, mounts).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{sub_path}: {err:?}");
        assert!(err.message().starts_with("config.mounts[0].image_sub_path"), "{err:?}");
    }
    // An image never pulled.
    let mut refused = config();
    refused.metadata.as_mut().unwrap().attempt = 99;
    let never = registry.reference("imgvol:never-pulled");
    let err = create_with_image_mounts(
        daemon,
        pod,
        pod_cfg,
        refused,
        vec![image_mount("/x", &never, "")],
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("config.mounts[0].image") && err.message().contains("pull"));

    let mut rt = daemon.runtime().await.unwrap();
    rt.remove_container(cri::RemoveContainerRequest { container_id: cid }).await.unwrap();
    images.remove_image(remove).await.expect("the image is free once its container is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_share_host_paths_and_keep_the_guest_to_them() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:volumes").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, pod_cfg) = daemon.run_pod("volumes", &log_dir).await;

    let mut host = HostVolumes::new();
    let rw = host.make_dir("rw");
    std::fs::write(rw.join("from-host"), "host wrote this\n").unwrap();
    let ro = host.make_dir("ro");
    std::fs::write(ro.join("config"), "v1\n").unwrap();
    let cm = host.make_dir("configmap");
    write_config_map_version(&cm, "..2026_01_01_00_00_00.1", "one\n");
    let single = host.path("single-file");
    std::fs::write(&single, "single\n").unwrap();
    let real = host.make_dir("real");
    std::fs::write(real.join("here"), "behind a link\n").unwrap();
    let linked = host.path("linked");
    std::os::unix::fs::symlink(&real, &linked).unwrap();
    // Symlinks that lead out of the volume on the host: the guest must resolve them itself.
    let secret = PathBuf::from(format!("/etc/podvisor-e2e-secret-{}", std::process::id()));
    std::fs::write(&secret, "host secret\n").unwrap();
    host.outside.push(secret.clone());
    let escape = host.make_dir("escape");
    std::os::unix::fs::symlink(&secret, escape.join("absolute")).unwrap();
    let up = format!("../../../../../../../..{}", secret.display());
    std::os::unix::fs::symlink(&up, escape.join("dotdot")).unwrap();
    // `ro` vs `rro` over a host submount.
    let layered = host.make_dir("layered");
    host.mount_tmpfs(&layered.join("sub"));
    // Propagation sources.
    let slave = host.make_dir("slave");
    host.make_shared(&slave);
    let shared = host.make_dir("shared");
    std::fs::create_dir_all(shared.join("inner")).unwrap();
    host.make_shared(&shared);

    let mut app = container_config("app", &image, &["sleep", "3600"]);
    let mut rro = volume(&layered, "/rro", true);
    rro.recursive_read_only = true;
    app.mounts = vec![
        volume(&rw, "/rw", false),
        volume(&ro, "/ro", true),
        volume(&cm, "/cm", true),
        volume(&single, "/single", false),
        volume(&linked, "/linked", true),
        volume(&escape, "/escape", false),
        volume(&layered, "/nonrec", true),
        rro,
        with_propagation(
            volume(&slave, "/slave", false),
            cri::MountPropagation::PropagationHostToContainer,
        ),
        with_propagation(
            volume(&shared, "/shared", false),
            cri::MountPropagation::PropagationHostToContainer,
        ),
    ];
    let app = daemon.create_and_start(&pod, &pod_cfg, app).await;

    // Read-write, both ways, and a host-side change is seen.
    assert_eq!(ok(&daemon, &app, "cat /rw/from-host").await, "host wrote this\n");
    ok(&daemon, &app, "echo guest wrote this > /rw/from-guest").await;
    assert_eq!(std::fs::read_to_string(rw.join("from-guest")).unwrap(), "guest wrote this\n");
    std::fs::write(rw.join("from-host"), "changed\n").unwrap();
    eventually_reads(&daemon, &app, "/rw/from-host", "changed\n").await;

    // Read-only: EROFS, the host file untouched, and the mount says so.
    assert_eq!(ok(&daemon, &app, "cat /ro/config").await, "v1\n");
    let err = fails(&daemon, &app, "echo x > /ro/config").await;
    assert!(err.contains("Read-only file system"), "{err}");
    let err = fails(&daemon, &app, "touch /ro/new").await;
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(std::fs::read_to_string(ro.join("config")).unwrap(), "v1\n");
    assert!(ok(&daemon, &app, "grep ' /ro ' /proc/mounts").await.contains(" ro,"));

    // configMap refresh: kubelet swaps `..data`; the container follows within seconds.
    assert_eq!(ok(&daemon, &app, "cat /cm/key").await, "one\n");
    write_config_map_version(&cm, "..2026_01_01_00_01_00.2", "two\n");
    eventually_reads(&daemon, &app, "/cm/key", "two\n").await;

    // A single file, read-write both ways.
    assert_eq!(ok(&daemon, &app, "cat /single").await, "single\n");
    ok(&daemon, &app, "echo from guest > /single").await;
    assert_eq!(std::fs::read_to_string(&single).unwrap(), "from guest\n");

    // A host path that is a symlink is resolved on the host.
    assert_eq!(ok(&daemon, &app, "cat /linked/here").await, "behind a link\n");

    // Symlinks inside a volume resolve in the container: the host file is out of reach.
    let target = ok(&daemon, &app, "readlink /escape/absolute").await;
    assert_eq!(target.trim(), secret.display().to_string());
    fails(&daemon, &app, "cat /escape/absolute").await;
    fails(&daemon, &app, "cat /escape/dotdot").await;
    let found =
        ok(&daemon, &app, "grep -rl 'host secret' /escape /rw /etc 2>/dev/null; true").await;
    assert!(found.trim().is_empty(), "the host secret is visible: {found}");

    // `ro` leaves a submount writable (as runc does); `rro` makes it read-only too.
    let err = fails(&daemon, &app, "touch /nonrec/top").await;
    assert!(err.contains("Read-only file system"), "{err}");
    ok(&daemon, &app, "touch /nonrec/sub/written").await;
    assert!(layered.join("sub/written").exists());
    let err = fails(&daemon, &app, "touch /rro/sub/refused").await;
    assert!(err.contains("Read-only file system"), "{err}");
    let err = fails(&daemon, &app, "touch /rro/refused").await;
    assert!(err.contains("Read-only file system"), "{err}");

    // rslave: a host mount made after the container started shows in it.
    host.mount_tmpfs(&slave.join("late"));
    std::fs::write(slave.join("late/file"), "mounted later\n").unwrap();
    eventually_reads(&daemon, &app, "/slave/late/file", "mounted later\n").await;

    // rshared: a privileged container's mount reaches the pod's other containers of the
    // volume, but not the host (it stops at the VM boundary).
    let mut mounter = container_config("mounter", &image, &["sleep", "3600"]);
    mounter.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    mounter.mounts = vec![with_propagation(
        volume(&shared, "/shared", false),
        cri::MountPropagation::PropagationBidirectional,
    )];
    let mounter = daemon.create_and_start(&pod, &pod_cfg, mounter).await;
    ok(&daemon, &mounter, "mount -t tmpfs tmpfs /shared/inner && echo in guest > /shared/inner/f")
        .await;
    eventually_reads(&daemon, &app, "/shared/inner/f", "in guest\n").await;
    assert!(!shared.join("inner/f").exists(), "a guest mount reached the host");

    // The guest kernel has what a privileged container managing the VM's network needs.
    ok(&daemon, &mounter, "ip link add br0 type bridge && ip link show br0").await;
    ok(&daemon, &mounter, "brctl addbr br1 && ip link add link br1 name br1.5 type vlan id 5")
        .await;
    ok(&daemon, &mounter, "ip link add dummy9 type dummy && ip link add bond9 type bond").await;

    let mut rt = daemon.runtime().await.unwrap();
    let status = rt.status(cri::StatusRequest { verbose: false }).await.unwrap().into_inner();
    assert!(status
        .runtime_handlers
        .iter()
        .all(|h| h.features.as_ref().is_some_and(|f| f.recursive_read_only_mounts)));

    check_image_volumes(&daemon, &registry, &pod, &pod_cfg, &image).await;

    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}

/// `[vm] allowed_devices`: a CRI device on the list is the guest's own node of that path;
/// any other is refused with InvalidArgument naming `devices[n]`. The device cgroup lets a
/// container open its allowed and the standard devices only; a privileged one, all of the VM's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_devices_are_the_guests_own_and_others_are_refused() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:devices").unwrap();
    let daemon =
        TestDaemon::start_with_vm("", "allowed_devices = [\"/dev/fuse\", \"/dev/net/tun\"]")
            .await
            .unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, pod_cfg) = daemon.run_pod("devices", &log_dir).await;
    let device = |host: &str, container: &str| cri::Device {
        host_path: host.into(),
        container_path: container.into(),
        permissions: "rwm".into(),
    };

    let mut refused = container_config("refused", &image, &["sleep", "3600"]);
    refused.devices = vec![device("/dev/fuse", "/dev/fuse"), device("/dev/sda", "/dev/sda")];
    let mut rt = daemon.runtime().await.unwrap();
    let err = rt
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(refused),
            sandbox_config: Some(pod_cfg.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("config.devices[1] (/dev/sda)"), "{err:?}");

    let mut app = container_config("app", &image, &["sleep", "3600"]);
    app.devices = vec![device("/dev/net/tun", "/dev/net/tun"), device("/dev/fuse", "/dev/fuse2")];
    let app = daemon.create_and_start(&pod, &pod_cfg, app).await;
    // The guest's nodes: tun is 10:200 and fuse 10:229 in any Linux.
    let nodes = ok(&daemon, &app, "stat -c '%t:%T' /dev/net/tun /dev/fuse2").await;
    assert_eq!(nodes, "a:c8\na:e5\n");
    ok(&daemon, &app, "test ! -e /dev/fuse").await;

    // The device cgroup: allowed and standard devices open; nodes the container makes itself
    // (it has CAP_MKNOD, and mknod is allowed, as with runc) of the VM's other devices do not.
    ok(&daemon, &app, "exec 3<>/dev/fuse2 4<>/dev/net/tun; : > /dev/null; : < /dev/zero").await;
    ok(&daemon, &app, "mknod /tmp/kmsg c 1 11 && mknod /tmp/loop b 7 0").await;
    for node in ["/tmp/kmsg", "/tmp/loop"] {
        let err = fails(&daemon, &app, &format!(": < {node}")).await;
        assert!(err.contains("Operation not permitted"), "{node}: {err}");
    }
    // A privileged container has all of the VM's devices.
    let mut admin = container_config("admin", &image, &["sleep", "3600"]);
    admin.linux = Some(cri::LinuxContainerConfig {
        security_context: Some(cri::LinuxContainerSecurityContext {
            privileged: true,
            ..Default::default()
        }),
        resources: Some(cri::LinuxContainerResources {
            memory_limit_in_bytes: 64 << 20,
            ..Default::default()
        }),
    });
    let admin = daemon.create_and_start(&pod, &pod_cfg, admin).await;
    ok(&daemon, &admin, ": > /dev/kmsg && mknod /tmp/kmsg c 1 11 && : > /tmp/kmsg").await;

    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}
