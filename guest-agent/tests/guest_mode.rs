//! The agent as PID 1 of a real VM: QEMU (TCG, microvm) boots the guest kernel with the
//! agent's initramfs, vhost-device-vsock carries the gRPC connection (Firecracker-style hybrid
//! vsock socket) and virtiofsd shares a busybox layer for the container rootfs.
//!
//! Artefacts: PODVISOR_KERNEL (default build/vmlinux) and PODVISOR_INITRAMFS (default
//! build/initramfs.cpio, made by guest-agent/mkinitramfs.sh build), qemu-system-x86_64,
//! vhost-device-vsock and virtiofsd (PATH or ~/.cargo/bin). Skips when any is absent unless
//! PODVISOR_REQUIRE_E2E=1.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use podvisor_proto::agent::agent_client::AgentClient;
use podvisor_proto::agent::{
    ContainerRef, CreateContainerRequest, CreateSandboxRequest, Empty, ExecProcessRequest,
    HostEntry, NetInterface, NetRoute, PingRequest, ProcessRef, ReadOutputRequest,
    RemoveContainerRequest, Rootfs, SetupNetworkRequest, SharedFs, StdioConfig,
    UpdateContainerRequest,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Channel, Endpoint};

const BUSYBOX: &str = "/bin/busybox";
/// The guest's virtio-net device, on a QEMU hub with nothing else on it: no traffic leaves.
const GUEST_MAC: &str = "02:42:0a:58:00:05";

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

struct Artefacts {
    kernel: PathBuf,
    initramfs: PathBuf,
    qemu: PathBuf,
    vsock: PathBuf,
    virtiofsd: PathBuf,
}

fn artefacts() -> Result<Artefacts, String> {
    let file = |env: &str, default: &str| -> Result<PathBuf, String> {
        let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| repo_path(default));
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!("{} is missing (set {env})", path.display()))
        }
    };
    let tool = |name: &str| find_tool(name).ok_or_else(|| format!("{name} is not installed"));
    if !nix::unistd::geteuid().is_root() {
        return Err("not root".into());
    }
    if !Path::new(BUSYBOX).is_file() {
        return Err(format!("{BUSYBOX} is missing"));
    }
    Ok(Artefacts {
        kernel: file("PODVISOR_KERNEL", "build/vmlinux")?,
        initramfs: file("PODVISOR_INITRAMFS", "build/initramfs.cpio")?,
        qemu: tool("qemu-system-x86_64")?,
        vsock: tool("vhost-device-vsock")?,
        virtiofsd: tool("virtiofsd")?,
    })
}

/// Kills the VM and its device back-ends when the test ends.
struct Vm {
    children: Vec<Child>,
    dir: tempfile::TempDir,
    ready: Option<tokio::net::UnixListener>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Vm {
    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }
}

async fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{} did not appear", path.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn boot(a: &Artefacts) -> Vm {
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    let layer = shared.join("busybox");
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc"] {
        std::fs::create_dir_all(layer.join(d)).unwrap();
    }
    std::fs::copy(BUSYBOX, layer.join("bin/busybox")).unwrap();
    for applet in ["sh", "echo", "cat", "hostname", "sleep", "touch", "ls", "head", "ip"] {
        std::os::unix::fs::symlink("busybox", layer.join("bin").join(applet)).unwrap();
    }
    let d = dir.path().to_path_buf();
    // The agent announces itself here (host port 1025) once it listens; the host must not
    // dial a guest whose vsock device is still coming up (see AGENT_READY_VSOCK_PORT).
    let ready = tokio::net::UnixListener::bind(
        d.join(format!("vm.vsock_{}", podvisor_proto::AGENT_READY_VSOCK_PORT)),
    )
    .unwrap();
    let mut vm = Vm { children: Vec::new(), dir, ready: Some(ready) };
    vm.children.push(
        Command::new(&a.vsock)
            .arg("--guest-cid=3")
            .arg(format!("--socket={}", d.join("vhu.sock").display()))
            .arg(format!("--uds-path={}", d.join("vm.vsock").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    vm.children.push(
        Command::new(&a.virtiofsd)
            .arg(format!("--socket-path={}", d.join("vfs.sock").display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .args(["--cache=always", "--readonly", "--sandbox=none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&d.join("vhu.sock")).await;
    wait_for(&d.join("vfs.sock")).await;
    vm.children.push(
        Command::new(&a.qemu)
            .args([
                "-M",
                "microvm,x-option-roms=off,rtc=off,acpi=off,isa-serial=on,memory-backend=mem",
            ])
            .args(["-accel", "tcg", "-cpu", "max", "-m", "256", "-smp", "1"])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .args(["-object", "memory-backend-memfd,id=mem,size=256M,share=on"])
            .arg("-chardev")
            .arg(format!("socket,id=vsk,path={}", d.join("vhu.sock").display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vsk"])
            .arg("-chardev")
            .arg(format!("socket,id=vfs,path={}", d.join("vfs.sock").display()))
            .args(["-device", "vhost-user-fs-device,chardev=vfs,tag=podvisor"])
            .args(["-netdev", "hubport,id=net0,hubid=0"])
            .arg("-device")
            .arg(format!("virtio-net-device,netdev=net0,mac={GUEST_MAC}"))
            .arg("-chardev")
            .arg(format!("file,id=ser,path={}", d.join("console.log").display()))
            .args(["-serial", "chardev:ser"])
            .arg("-kernel")
            .arg(&a.kernel)
            .arg("-initrd")
            .arg(&a.initramfs)
            .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    vm
}

/// Connects through the hybrid vsock socket: `CONNECT 1024\n` -> `OK <port>\n`.
async fn hybrid_vsock(path: PathBuf) -> std::io::Result<tokio::net::UnixStream> {
    let mut stream = tokio::net::UnixStream::connect(path).await?;
    stream.write_all(format!("CONNECT {}\n", podvisor_proto::AGENT_VSOCK_PORT).as_bytes()).await?;
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            break;
        }
        line.push(byte);
    }
    if !line.starts_with(b"OK ") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            String::from_utf8_lossy(&line).into_owned(),
        ));
    }
    Ok(stream)
}

async fn connect(vm: &mut Vm) -> AgentClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready = vm.ready.take().unwrap();
    match tokio::time::timeout(Duration::from_secs(90), ready.accept()).await {
        Ok(accepted) => drop(accepted.unwrap()),
        Err(_) => panic!("agent did not announce itself; console:\n{}", vm.console()),
    }
    let path = vm.dir.path().join("vm.vsock");
    loop {
        let p = path.clone();
        let channel = Endpoint::from_static("http://agent.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let p = p.clone();
                async move { hybrid_vsock(p).await.map(TokioIo::new) }
            }))
            .await;
        if let Ok(channel) = channel {
            let mut client = AgentClient::new(channel);
            if client.ping(PingRequest {}).await.is_ok() {
                return client;
            }
        }
        assert!(Instant::now() < deadline, "agent did not answer; console:\n{}", vm.console());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn read_stdout(client: &mut AgentClient<Channel>, id: &str, exec_id: &str) -> String {
    let mut stream = client
        .read_output(ReadOutputRequest {
            process: Some(ProcessRef { container_id: id.into(), exec_id: exec_id.into() }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        if chunk.stream == podvisor_proto::agent::OutputStream::Stdout as i32 {
            out.extend_from_slice(&chunk.data);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `script` as exec `exec_id` in container `id`: (stdout, exit code).
async fn exec_sh(
    client: &mut AgentClient<Channel>,
    id: &str,
    exec_id: &str,
    script: &str,
) -> (String, i32) {
    client
        .exec_process(ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process_json: json!({"args": ["sh", "-c", script], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}})
                .to_string()
                .into_bytes(),
            stdio: Some(StdioConfig::default()),
        })
        .await
        .unwrap();
    let out = read_stdout(client, id, exec_id).await;
    let status = client
        .wait_process(ProcessRef { container_id: id.into(), exec_id: exec_id.into() })
        .await
        .unwrap()
        .into_inner();
    (out, status.exit_code)
}

fn update(id: &str, resources: serde_json::Value) -> UpdateContainerRequest {
    UpdateContainerRequest {
        container_id: id.into(),
        resources_json: resources.to_string().into_bytes(),
    }
}

#[tokio::test]
async fn agent_runs_containers_as_pid_1_in_a_qemu_guest() {
    let a = match artefacts() {
        Ok(a) => a,
        Err(why) if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") => {
            panic!("guest-mode test cannot run: {why}")
        }
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let started = Instant::now();
    let mut vm = boot(&a).await;
    let mut client = connect(&mut vm).await;
    eprintln!("agent answered after {:?}", started.elapsed());

    client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "sb".into(),
            hostname: "guest-pod".into(),
            dns_servers: vec!["10.96.0.10".into()],
            mount_shared_fs: true,
            ..Default::default()
        })
        .await
        .unwrap();
    // Listed shares: the image share again (already mounted there: fine) and a second,
    // read-only view of it; a path outside /run/podvisor is refused.
    let share = |guest_path: &str| SharedFs {
        tag: podvisor_proto::SHARED_FS_TAG.into(),
        guest_path: guest_path.into(),
        read_only: true,
    };
    let listed = |shares: Vec<SharedFs>| CreateSandboxRequest {
        sandbox_id: "sb".into(),
        hostname: "guest-pod".into(),
        dns_servers: vec!["10.96.0.10".into()],
        mount_shared_fs: true,
        shared_fs: shares,
        ..Default::default()
    };
    client
        .create_sandbox(listed(vec![
            share(podvisor_proto::GUEST_SHARED_DIR),
            share("/run/podvisor/image-view"),
        ]))
        .await
        .unwrap();
    let refused = client.create_sandbox(listed(vec![share("/mnt")])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    let spec = json!({
        "ociVersion": "1.0.2",
        "process": {
            "user": {"uid": 0, "gid": 0},
            "args": ["sh", "-c", "echo hello from the guest; hostname; touch /written && echo wrote; cat /proc/self/cgroup; ls /view/busybox/bin/sh"],
            "env": ["PATH=/bin"],
            "cwd": "/"
        },
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/view", "type": "bind", "source": "/run/podvisor/image-view", "options": ["rbind", "ro"]}
        ],
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}]}
    });
    let id = "guest-c1";
    let t = Instant::now();
    client
        .create_container(CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec.to_string().into_bytes(),
            rootfs: Some(Rootfs { lower_dirs: vec!["busybox".into()], read_only: false }),
            stdio: Some(StdioConfig::default()),
            join_pod_pid_namespace: false,
            privileged: false,
            devices: Vec::new(),
        })
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.into() }).await.unwrap();
    let out = read_stdout(&mut client, id, "").await;
    let status = client
        .wait_process(ProcessRef { container_id: id.into(), exec_id: String::new() })
        .await
        .unwrap()
        .into_inner();
    eprintln!("container ran in {:?}: {out:?}", t.elapsed());
    assert_eq!(status.exit_code, 0, "{out}");
    assert!(!status.oom_killed);
    assert!(out.starts_with("hello from the guest\nguest-pod\nwrote\n"), "{out}");
    assert!(out.contains("0::/podvisor/guest-c1"), "{out}");
    assert!(out.contains("/view/busybox/bin/sh\n"), "the listed share is mounted: {out}");

    // Exec needs a running container.
    let id2 = "guest-c2";
    let mut sleeper = spec.clone();
    sleeper["process"]["args"] = json!(["sleep", "1000"]);
    // Its rootfs is read-only: no mount point for the share view can be made in it.
    sleeper["mounts"] = json!(spec["mounts"].as_array().unwrap()[..2]);
    client
        .create_container(CreateContainerRequest {
            container_id: id2.into(),
            oci_spec_json: sleeper.to_string().into_bytes(),
            rootfs: Some(Rootfs { lower_dirs: vec!["busybox".into()], read_only: true }),
            stdio: Some(StdioConfig::default()),
            join_pod_pid_namespace: false,
            privileged: false,
            devices: Vec::new(),
        })
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id2.into() }).await.unwrap();
    client
        .exec_process(ExecProcessRequest {
            container_id: id2.into(),
            exec_id: "e1".into(),
            oci_process_json: json!({"args": ["sh", "-c", "echo exec ok; touch /x || exit 7"], "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}})
                .to_string()
                .into_bytes(),
            stdio: Some(StdioConfig::default()),
        })
        .await
        .unwrap();
    assert_eq!(read_stdout(&mut client, id2, "e1").await, "exec ok\n");
    let status = client
        .wait_process(ProcessRef { container_id: id2.into(), exec_id: "e1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.exit_code, 7);
    // The guest's cgroup2 root delegates its controllers: stats are real.
    let stats = client
        .container_stats(ContainerRef { container_id: id2.into() })
        .await
        .unwrap()
        .into_inner();
    eprintln!("stats of a running container: {stats:?}");
    assert!(stats.memory_usage_bytes > 0, "{stats:?}");
    assert!(stats.pids >= 1, "{stats:?}");
    assert!(stats.cpu_usage_nanos > 0, "{stats:?}");

    // SetupNetwork: the device found by MAC is renamed, sized, addressed and routed; sent
    // twice, as a retrying host would.
    let network = SetupNetworkRequest {
        interfaces: vec![NetInterface {
            mac: GUEST_MAC.into(),
            name: "pod0".into(),
            mtu: 1400,
            addresses: vec!["10.88.0.5/16".into(), "fd00:10::5/64".into()],
        }],
        routes: vec![
            NetRoute {
                destination: "0.0.0.0/0".into(),
                gateway: "10.88.0.1".into(),
                interface: "pod0".into(),
            },
            NetRoute {
                destination: "10.200.0.0/16".into(),
                gateway: String::new(),
                interface: "pod0".into(),
            },
            NetRoute {
                destination: "::/0".into(),
                gateway: "fd00:10::1".into(),
                interface: "pod0".into(),
            },
        ],
        hosts: vec![HostEntry { ip: "10.88.0.5".into(), names: vec!["guest-pod".into()] }],
    };
    client.setup_network(network.clone()).await.unwrap();
    client.setup_network(network.clone()).await.unwrap();
    let (out, code) = exec_sh(
        &mut client,
        id2,
        "net",
        "ip -o link show pod0; ip -o addr show pod0; ip route; ip -6 route; ip -o link show lo",
    )
    .await;
    eprintln!("guest network after SetupNetwork:\n{out}");
    assert_eq!(code, 0, "{out}");
    for want in [
        "pod0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1400",
        "inet 10.88.0.5/16",
        "inet6 fd00:10::5/64 scope global",
        "default via 10.88.0.1 dev pod0",
        "10.200.0.0/16 dev pod0 scope link",
        "default via fd00:10::1 dev pod0",
        "lo: <LOOPBACK,UP,LOWER_UP>",
    ] {
        assert!(out.contains(want), "{want:?} is missing:\n{out}");
    }
    let v6 = out.lines().find(|l| l.contains("fd00:10::5")).unwrap_or_default();
    assert!(!v6.contains("tentative"), "the pod's IPv6 address waits for DAD: {v6}");
    let mut unknown = network;
    unknown.interfaces[0].mac = "02:00:00:00:00:99".into();
    unknown.routes.clear();
    let err = client.setup_network(unknown).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    client.remove_container(RemoveContainerRequest { container_id: id2.into() }).await.unwrap();

    // Live limits: a running container with its own cgroup namespace sees its cgroup at
    // /sys/fs/cgroup, where UpdateContainer's writes show.
    let id3 = "guest-c3";
    let mut limited = spec.clone();
    limited["process"]["args"] = json!(["sleep", "1000"]);
    limited["mounts"] = json!([
        spec["mounts"][0],
        spec["mounts"][1],
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev"]}
    ]);
    limited["linux"]["namespaces"] =
        json!([{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "cgroup"}]);
    client
        .create_container(CreateContainerRequest {
            container_id: id3.into(),
            oci_spec_json: limited.to_string().into_bytes(),
            rootfs: Some(Rootfs { lower_dirs: vec!["busybox".into()], read_only: false }),
            stdio: Some(StdioConfig::default()),
            join_pod_pid_namespace: false,
            privileged: false,
            devices: Vec::new(),
        })
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id3.into() }).await.unwrap();
    let sandbox = client.sandbox_stats(Empty {}).await.unwrap().into_inner();
    eprintln!("sandbox stats with a running container: {sandbox:?}");
    assert!(sandbox.memory_total_bytes > 0, "{sandbox:?}");
    assert!(sandbox.memory_available_bytes > 0, "{sandbox:?}");
    assert!(sandbox.memory_usage_bytes > 0, "{sandbox:?}");
    assert!(sandbox.pids >= 1, "{sandbox:?}");

    let stats = |client: &mut AgentClient<Channel>| {
        let mut client = client.clone();
        async move {
            client
                .container_stats(ContainerRef { container_id: id3.into() })
                .await
                .unwrap()
                .into_inner()
        }
    };
    let before = stats(&mut client).await;
    let (out, code) = exec_sh(&mut client, id3, "w", "head -c 1048576 /dev/zero > /big").await;
    assert_eq!(code, 0, "{out}");
    let after = stats(&mut client).await;
    eprintln!("stats before and after writing 1 MiB: {before:?} {after:?}");
    assert!(after.writable_layer_bytes >= before.writable_layer_bytes + (1 << 20), "{after:?}");
    assert!(after.writable_layer_inodes > before.writable_layer_inodes, "{after:?}");
    assert!(after.page_faults > 0, "{after:?}");

    client
        .update_container(update(
            id3,
            json!({"memory": {"limit": 32 << 20}, "cpu": {"quota": 50000, "period": 100000},
                   "unified": {"memory.high": "30000000"}}),
        ))
        .await
        .unwrap();
    let (out, code) = exec_sh(
        &mut client,
        id3,
        "r",
        "cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/cpu.max /sys/fs/cgroup/memory.high",
    )
    .await;
    assert_eq!((out.as_str(), code), ("33554432\n50000 100000\n29999104\n", 0));
    // The kernel refuses a CPU the VM lacks; the error names the file.
    let refused =
        client.update_container(update(id3, json!({"cpu": {"cpus": "7"}}))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
    assert!(refused.message().contains("cpuset.cpus"), "{refused}");
    let refused = client.update_container(update(id, json!({}))).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "stopped: {refused}");
    client.remove_container(RemoveContainerRequest { container_id: id3.into() }).await.unwrap();

    // OOM: the init outgrows its 16 MiB limit (the shell doubles a variable) and is killed.
    let id4 = "guest-oom";
    let mut hog = spec.clone();
    hog["process"]["args"] = json!(["sh", "-c", "x=0123456789abcdef; while :; do x=$x$x; done"]);
    hog["mounts"] = json!(spec["mounts"].as_array().unwrap()[..2]);
    hog["linux"]["resources"] = json!({"memory": {"limit": 16 << 20}});
    client
        .create_container(CreateContainerRequest {
            container_id: id4.into(),
            oci_spec_json: hog.to_string().into_bytes(),
            rootfs: Some(Rootfs { lower_dirs: vec!["busybox".into()], read_only: true }),
            stdio: Some(StdioConfig::default()),
            join_pod_pid_namespace: false,
            privileged: false,
            devices: Vec::new(),
        })
        .await
        .unwrap();
    let t = Instant::now();
    client.start_container(ContainerRef { container_id: id4.into() }).await.unwrap();
    for _ in 0..2 {
        let wait =
            client.wait_process(ProcessRef { container_id: id4.into(), exec_id: String::new() });
        let status = tokio::time::timeout(Duration::from_secs(120), wait)
            .await
            .unwrap_or_else(|_| panic!("not OOM-killed; console:\n{}", vm.console()))
            .unwrap()
            .into_inner();
        assert_eq!((status.exit_code, status.signal, status.oom_killed), (137, 9, true));
    }
    eprintln!("OOM-killed after {:?}", t.elapsed());
    client.remove_container(RemoveContainerRequest { container_id: id4.into() }).await.unwrap();

    // Shutdown powers the VM off: QEMU exits (-no-reboot).
    let _ = client.shutdown(Empty {}).await;
    let mut vm = vm;
    let qemu = vm.children.last_mut().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(Some(_)) = qemu.try_wait() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU still running after Shutdown; console:\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("whole guest test took {:?}", started.elapsed());
    eprintln!("guest console:\n{}", vm.console());
}
