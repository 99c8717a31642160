//! The agent in host mode, driven over its unix socket by the generated gRPC client, running
//! real containers (busybox) with libcontainer.
//!
//! This host's cgroups are hybrid (cgroup2 only at /sys/fs/cgroup/unified) while libcontainer
//! wants cgroup2 at /sys/fs/cgroup: each agent runs in a private mount namespace (`unshare
//! --mount --propagation private`) where the cgroup2 hierarchy is mounted at /sys/fs/cgroup.
//! Needs root, /bin/busybox (static) and unshare; otherwise the tests skip (or fail with
//! PODVISOR_REQUIRE_E2E=1).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use podvisor_proto::agent::agent_client::AgentClient;
use podvisor_proto::agent::{
    ContainerRef, CreateContainerRequest, CreateSandboxRequest, Empty, ExecProcessRequest,
    OutputStream, PingRequest, ProcessRef, ReadOutputRequest, RemoveContainerRequest,
    ResizeTtyRequest, Rootfs, SetupNetworkRequest, SharedFs, SignalProcessRequest, StdioConfig,
    UpdateContainerRequest, WriteStdinRequest,
};
use serde_json::json;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

const BUSYBOX: &str = "/bin/busybox";
const LAYER: &str = "busybox";

/// Returns why the tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root".into());
    }
    if !Path::new(BUSYBOX).exists() {
        return Some(format!("{BUSYBOX} is missing (apt-get install busybox-static)"));
    }
    if Command::new("unshare").arg("--version").output().is_err() {
        return Some("unshare (util-linux) is missing".into());
    }
    None
}

/// Skips the test (returns None) unless its prerequisites are there.
fn prerequisites() -> Option<()> {
    match missing_prerequisite() {
        None => Some(()),
        Some(why) if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") => {
            panic!("agent host-mode tests cannot run: {why}")
        }
        Some(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

/// A busybox root filesystem as a lower dir: bin/busybox plus applet symlinks.
fn make_busybox_layer(shared: &Path) {
    let layer = shared.join(LAYER);
    for dir in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(layer.join(dir)).unwrap();
    }
    std::fs::copy(BUSYBOX, layer.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            std::os::unix::fs::symlink("busybox", layer.join("bin").join(applet)).unwrap();
        }
    }
    std::fs::write(layer.join("etc/motd"), "from the lower layer\n").unwrap();
}

struct TestAgent {
    child: Child,
    client: AgentClient<Channel>,
    dir: tempfile::TempDir,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        // SIGTERM makes the agent remove its containers (processes, cgroups, mounts).
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TestAgent {
    async fn start() -> TestAgent {
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        let state = dir.path().join("state");
        make_busybox_layer(&shared);
        let socket = dir.path().join("agent.sock");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg("mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec \"$0\" \"$@\"")
            .arg(env!("CARGO_BIN_EXE_podvisor-agent"))
            .arg("--listen")
            .arg(format!("unix:{}", socket.display()))
            .arg("--shared-dir")
            .arg(&shared)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let client = connect(&socket).await;
        TestAgent { child, client, dir }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn shared_dir(&self) -> PathBuf {
        self.dir.path().join("shared")
    }
}

async fn connect(socket: &Path) -> AgentClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let path = socket.to_path_buf();
        let channel = Endpoint::from_static("http://agent.invalid")
            .initial_stream_window_size(Some(podvisor_proto::AGENT_STREAM_WINDOW))
            .connect_with_connector(tower::service_fn(move |_| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await;
        if let Ok(channel) = channel {
            let mut client = AgentClient::new(channel);
            if client.ping(podvisor_proto::agent::PingRequest {}).await.is_ok() {
                return client;
            }
        }
        assert!(Instant::now() < deadline, "agent did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A container id unique across concurrently running tests (cgroups are host-wide).
fn unique_id(name: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!("{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn spec(args: &[&str], terminal: bool) -> Vec<u8> {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/bin", "TERM=xterm"],
            "cwd": "/",
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs"},
        "hostname": "test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}
            ],
            "seccomp": {
                "defaultAction": "SCMP_ACT_ALLOW",
                "architectures": ["SCMP_ARCH_X86_64"],
                "syscalls": [{
                    "names": ["mknod", "mknodat"],
                    "action": "SCMP_ACT_ERRNO",
                    "errnoRet": 1
                }]
            }
        }
    })
    .to_string()
    .into_bytes()
}

fn create_request(
    id: &str,
    args: &[&str],
    stdio: StdioConfig,
    read_only: bool,
) -> CreateContainerRequest {
    CreateContainerRequest {
        container_id: id.to_string(),
        oci_spec_json: spec(args, stdio.tty),
        rootfs: Some(Rootfs { lower_dirs: vec![LAYER.to_string()], read_only }),
        stdio: Some(stdio),
        join_pod_pid_namespace: false,
        privileged: false,
        devices: Vec::new(),
    }
}

fn process_ref(id: &str, exec_id: &str) -> ProcessRef {
    ProcessRef { container_id: id.to_string(), exec_id: exec_id.to_string() }
}

/// ReadOutput for a first reader (it has nothing yet).
fn output_of(id: &str, exec_id: &str) -> ReadOutputRequest {
    ReadOutputRequest { process: Some(process_ref(id, exec_id)), ..Default::default() }
}

/// Reads a process's whole output: (stdout, stderr).
async fn read_all(client: &mut AgentClient<Channel>, id: &str, exec_id: &str) -> (String, String) {
    let mut stream = client.read_output(output_of(id, exec_id)).await.unwrap().into_inner();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let read = async {
        while let Some(chunk) = stream.message().await.unwrap() {
            if chunk.stream == OutputStream::Stderr as i32 {
                err.extend_from_slice(&chunk.data);
            } else {
                out.extend_from_slice(&chunk.data);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("output did not end");
    (String::from_utf8_lossy(&out).into_owned(), String::from_utf8_lossy(&err).into_owned())
}

/// Reads output until `needle` appears (the stream stays open).
async fn read_until(
    stream: &mut tonic::Streaming<podvisor_proto::agent::OutputChunk>,
    needle: &str,
) -> String {
    let mut seen = String::new();
    let read = async {
        while !seen.contains(needle) {
            match stream.message().await.unwrap() {
                Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk.data)),
                None => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("{needle:?} did not appear"));
    seen
}

async fn run_container(
    agent: &mut TestAgent,
    id: &str,
    args: &[&str],
    read_only: bool,
) -> (String, String, i32) {
    let client = &mut agent.client;
    client
        .create_container(create_request(id, args, StdioConfig::default(), read_only))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.into() }).await.unwrap();
    let (out, err) = read_all(client, id, "").await;
    let status = client.wait_process(process_ref(id, "")).await.unwrap().into_inner();
    (out, err, status.exit_code)
}

#[tokio::test]
async fn create_start_output_and_exit_code() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("basic");
    let (out, err, code) = run_container(
        &mut agent,
        &id,
        &["sh", "-c", "echo out; echo err >&2; hostname; exit 3"],
        false,
    )
    .await;
    assert_eq!(out, "out\ntest\n");
    assert_eq!(err, "err\n");
    assert_eq!(code, 3);
    // Waiting again after the exit answers at once.
    let again = agent.client.wait_process(process_ref(&id, "")).await.unwrap().into_inner();
    assert_eq!(again.exit_code, 3);
    assert_eq!(again.signal, 0);
    assert!(again.exited_at_unix_nanos > 0);
    agent
        .client
        .remove_container(RemoveContainerRequest { container_id: id.clone() })
        .await
        .unwrap();
    let gone = agent.client.wait_process(process_ref(&id, "")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
}

#[tokio::test]
async fn sigterm_ignored_then_sigkill() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("term");
    let client = &mut agent.client;
    client
        .create_container(create_request(
            &id,
            &["sh", "-c", "trap '' TERM; echo ready; while true; do sleep 1; done"],
            StdioConfig::default(),
            false,
        ))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    let mut stream = client.read_output(output_of(&id, "")).await.unwrap().into_inner();
    read_until(&mut stream, "ready").await;
    let signal = |sig: i32| SignalProcessRequest {
        process: Some(process_ref(&id, "")),
        signal: sig,
        all: true,
    };
    client.signal_process(signal(libc::SIGTERM)).await.unwrap();
    let mut waiter = client.clone();
    let wait =
        tokio::time::timeout(Duration::from_millis(700), waiter.wait_process(process_ref(&id, "")))
            .await;
    assert!(wait.is_err(), "the process should have ignored SIGTERM");
    client.signal_process(signal(libc::SIGKILL)).await.unwrap();
    let status = client.wait_process(process_ref(&id, "")).await.unwrap().into_inner();
    assert_eq!(status.exit_code, 128 + libc::SIGKILL);
    assert_eq!(status.signal, libc::SIGKILL);
    // The output stream ends once the process is gone.
    tokio::time::timeout(Duration::from_secs(10), async {
        while stream.message().await.unwrap().is_some() {}
    })
    .await
    .expect("output stream did not end");
}

#[tokio::test]
async fn exec_with_output_exit_code_and_seccomp() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("exec");
    let client = &mut agent.client;
    client
        .create_container(create_request(&id, &["sleep", "1000"], StdioConfig::default(), false))
        .await
        .unwrap();
    // Exec before start: wrong state.
    let exec = |exec_id: &str, args: &[&str]| ExecProcessRequest {
        container_id: id.clone(),
        exec_id: exec_id.to_string(),
        oci_process_json: json!({
            "args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": true
        })
        .to_string()
        .into_bytes(),
        stdio: Some(StdioConfig::default()),
    };
    let early = client.exec_process(exec("e0", &["true"])).await.unwrap_err();
    assert_eq!(early.code(), Code::FailedPrecondition);
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();

    client
        .exec_process(exec("e1", &["sh", "-c", "echo hi from exec; echo oops >&2; exit 5"]))
        .await
        .unwrap();
    let (out, err) = read_all(client, &id, "e1").await;
    // Still tracked until waited for: its id is taken.
    let dup = client.exec_process(exec("e1", &["true"])).await.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let status = client.wait_process(process_ref(&id, "e1")).await.unwrap().into_inner();
    assert_eq!((out.as_str(), err.as_str(), status.exit_code), ("hi from exec\n", "oops\n", 5));
    // Waited for and drained: the entry is gone.
    let gone = client.wait_process(process_ref(&id, "e1")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // The container's seccomp profile (mknod -> EPERM) applies to exec'd processes too.
    client
        .exec_process(exec("e2", &["sh", "-c", "mknod /tmp/fifo p && echo made || echo refused"]))
        .await
        .unwrap();
    let (out, _) = read_all(client, &id, "e2").await;
    assert_eq!(out, "refused\n");

    client.remove_container(RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
}

fn exec_request(id: &str, exec_id: &str, args: &[&str]) -> ExecProcessRequest {
    ExecProcessRequest {
        container_id: id.to_string(),
        exec_id: exec_id.to_string(),
        oci_process_json: json!({
            "args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0},
            "noNewPrivileges": true
        })
        .to_string()
        .into_bytes(),
        stdio: Some(StdioConfig::default()),
    }
}

async fn ping(client: &mut AgentClient<Channel>) -> podvisor_proto::agent::PingResponse {
    client.ping(PingRequest {}).await.unwrap().into_inner()
}

/// Probes (ExecSync: ExecProcess, ReadOutput to its end, WaitProcess) leave nothing behind in
/// the agent's process table; execs a host never waits for (a timed-out ExecSync, killed) are
/// bounded per container.
#[tokio::test]
async fn finished_execs_leave_the_process_table() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("probes");
    let client = &mut agent.client;
    client
        .create_container(create_request(&id, &["sleep", "1000"], StdioConfig::default(), false))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    let before = ping(client).await;
    assert_eq!(before.tracked_processes, 1, "only the container's init");
    assert!(before.rss_bytes > 0);
    const PROBES: usize = 200;
    let started = Instant::now();
    for i in 0..PROBES {
        let exec_id = format!("probe-{i}");
        client.exec_process(exec_request(&id, &exec_id, &["echo", "alive"])).await.unwrap();
        let (out, _) = read_all(client, &id, &exec_id).await;
        assert_eq!(out, "alive\n", "{exec_id}");
        let status = client.wait_process(process_ref(&id, &exec_id)).await.unwrap().into_inner();
        assert_eq!(status.exit_code, 0, "{exec_id}");
    }
    let after = ping(client).await;
    eprintln!(
        "{PROBES} execs in {:?}: tracked_processes {} -> {}, rss_bytes {} -> {}",
        started.elapsed(),
        before.tracked_processes,
        after.tracked_processes,
        before.rss_bytes,
        after.rss_bytes
    );
    assert_eq!(after.tracked_processes, before.tracked_processes);
    let gone = client.wait_process(process_ref(&id, "probe-0")).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);

    // Timed-out ExecSyncs: SIGKILLed, never read or waited for. Only the newest 32 stay.
    const KILLED: u32 = 40;
    for i in 0..KILLED {
        let exec_id = format!("hung-{i}");
        client.exec_process(exec_request(&id, &exec_id, &["sleep", "1000"])).await.unwrap();
        client
            .signal_process(SignalProcessRequest {
                process: Some(process_ref(&id, &exec_id)),
                signal: libc::SIGKILL,
                all: false,
            })
            .await
            .unwrap();
    }
    let bound = before.tracked_processes + 32;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut tracked = ping(client).await.tracked_processes;
    while tracked != bound && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tracked = ping(client).await.tracked_processes;
    }
    eprintln!("{KILLED} killed, unwaited execs: tracked_processes {tracked}");
    assert_eq!(tracked, bound);
    let newest = client.wait_process(process_ref(&id, &format!("hung-{}", KILLED - 1))).await;
    assert_eq!(newest.unwrap().into_inner().signal, libc::SIGKILL);
    client.remove_container(RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
    assert_eq!(ping(client).await.tracked_processes, 0);
}

#[tokio::test]
async fn stdin_is_forwarded_and_closed() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("stdin");
    let client = &mut agent.client;
    let stdio = StdioConfig { stdin: true, ..Default::default() };
    client
        .create_container(create_request(&id, &["sh", "-c", "cat; echo done"], stdio, false))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    for part in ["hello ", "world\n"] {
        client
            .write_stdin(WriteStdinRequest {
                process: Some(process_ref(&id, "")),
                data: part.as_bytes().to_vec(),
            })
            .await
            .unwrap();
    }
    client.close_stdin(process_ref(&id, "")).await.unwrap();
    let (out, _) = read_all(client, &id, "").await;
    assert_eq!(out, "hello world\ndone\n");
    let status = client.wait_process(process_ref(&id, "")).await.unwrap().into_inner();
    assert_eq!(status.exit_code, 0);
    let closed = client
        .write_stdin(WriteStdinRequest { process: Some(process_ref(&id, "")), data: b"x".to_vec() })
        .await
        .unwrap_err();
    assert_eq!(closed.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn tty_with_resize() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("tty");
    let client = &mut agent.client;
    let stdio = StdioConfig { stdin: true, tty: true, ..Default::default() };
    client
        .create_container(create_request(
            &id,
            &["sh", "-c", "[ -t 0 ] && echo is-a-tty; read line; stty size; echo got:$line"],
            stdio,
            false,
        ))
        .await
        .unwrap();
    client
        .resize_tty(ResizeTtyRequest {
            process: Some(process_ref(&id, "")),
            width: 100,
            height: 40,
        })
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    let mut stream = client.read_output(output_of(&id, "")).await.unwrap().into_inner();
    let mut seen = read_until(&mut stream, "is-a-tty").await;
    client
        .write_stdin(WriteStdinRequest {
            process: Some(process_ref(&id, "")),
            data: b"abc\n".to_vec(),
        })
        .await
        .unwrap();
    seen.push_str(&read_until(&mut stream, "got:abc").await);
    assert!(seen.contains("40 100"), "{seen:?}");
    let status = client.wait_process(process_ref(&id, "")).await.unwrap().into_inner();
    assert_eq!(status.exit_code, 0);
    // A pipe-based process has no terminal to resize.
    let id2 = unique_id("notty");
    client
        .create_container(create_request(&id2, &["true"], StdioConfig::default(), false))
        .await
        .unwrap();
    let err = client
        .resize_tty(ResizeTtyRequest { process: Some(process_ref(&id2, "")), width: 1, height: 1 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

/// Creates and starts a container from `spec`, then waits for its output and exit code.
async fn run_spec(
    agent: &mut TestAgent,
    id: &str,
    spec: serde_json::Value,
) -> (String, String, i32) {
    let client = &mut agent.client;
    let mut request = create_request(id, &["true"], StdioConfig::default(), false);
    request.oci_spec_json = spec.to_string().into_bytes();
    client.create_container(request).await.unwrap();
    client.start_container(ContainerRef { container_id: id.into() }).await.unwrap();
    let (out, err) = read_all(client, id, "").await;
    let status = client.wait_process(process_ref(id, "")).await.unwrap().into_inner();
    (out, err, status.exit_code)
}

fn spec_value(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&spec(args, false)).unwrap()
}

/// SCMP_CMP_MASKED_EQ means `(arg & value) == valueTwo`, as in the OCI spec and runc:
/// here `kill` is refused for signal 9 only (mask 0xf, 9). Execs get the same filter.
#[tokio::test]
async fn masked_seccomp_comparisons_keep_oci_semantics() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("masked");
    let script = "sleep 100 & p=$!; kill -9 $p && echo killed || echo refused; \
                  kill -15 $p && echo terminated";
    let mut spec = spec_value(&["sh", "-c", script]);
    spec["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{
            "names": ["kill"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
            "args": [{"index": 1, "value": 15, "valueTwo": 9, "op": "SCMP_CMP_MASKED_EQ"}]
        }]
    });
    let (out, _, code) = run_spec(&mut agent, &id, spec).await;
    assert_eq!((out.as_str(), code), ("refused\nterminated\n", 0));
}

/// Dropping every capability (every set empty) works, and a seccomp filter loads without
/// no_new_privs (it is loaded before the capabilities go).
#[tokio::test]
async fn all_capabilities_dropped_under_seccomp_without_no_new_privs() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("nocaps");
    let mut spec = spec_value(&[
        "sh",
        "-c",
        "grep -E '^(CapEff|CapBnd|Seccomp|NoNewPrivs):' /proc/self/status",
    ]);
    let process = spec["process"].as_object_mut().unwrap();
    process.remove("noNewPrivileges");
    process.insert(
        "capabilities".into(),
        json!({"bounding": [], "effective": [], "permitted": [], "inheritable": [], "ambient": []}),
    );
    let (out, err, code) = run_spec(&mut agent, &id, spec).await;
    assert_eq!(code, 0, "{err}");
    let fields: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(
        fields,
        vec![
            vec!["CapEff:", "0000000000000000"],
            vec!["CapBnd:", "0000000000000000"],
            vec!["NoNewPrivs:", "0"],
            vec!["Seccomp:", "2"],
        ]
    );
}

#[tokio::test]
async fn read_only_rootfs_refuses_writes() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("ro");
    let (out, err, code) = run_container(
        &mut agent,
        &id,
        &["sh", "-c", "echo x > /newfile; echo rc=$?; cat /etc/motd"],
        true,
    )
    .await;
    assert_eq!(out, "rc=1\nfrom the lower layer\n");
    assert!(err.contains("Read-only file system"), "{err:?}");
    assert_eq!(code, 0);
}

#[tokio::test]
async fn writes_land_in_the_upper_layer_only() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("rw");
    let (out, _, code) = run_container(
        &mut agent,
        &id,
        &[
            "sh",
            "-c",
            "echo new > /newfile; echo changed > /etc/motd; rm /bin/vi; cat /newfile /etc/motd",
        ],
        false,
    )
    .await;
    assert_eq!((out.as_str(), code), ("new\nchanged\n", 0));
    let upper = agent.state_dir().join("containers").join(&id).join("upper");
    assert_eq!(std::fs::read_to_string(upper.join("newfile")).unwrap(), "new\n");
    assert_eq!(std::fs::read_to_string(upper.join("etc/motd")).unwrap(), "changed\n");
    let lower = agent.shared_dir().join(LAYER);
    assert!(!lower.join("newfile").exists());
    assert_eq!(std::fs::read_to_string(lower.join("etc/motd")).unwrap(), "from the lower layer\n");
    assert!(lower.join("bin/vi").symlink_metadata().is_ok());
}

#[tokio::test]
async fn remove_running_container() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("rm");
    let client = &mut agent.client;
    let pid = client
        .create_container(create_request(&id, &["sleep", "1000"], StdioConfig::default(), false))
        .await
        .unwrap()
        .into_inner()
        .pid;
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    let mut waiter = client.clone();
    let wait = tokio::spawn({
        let id = id.clone();
        async move { waiter.wait_process(process_ref(&id, "")).await }
    });
    // Let the waiter's call reach the agent before the container goes away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    client.remove_container(RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
    let status = wait.await.unwrap().unwrap().into_inner();
    assert_eq!(status.signal, libc::SIGKILL);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            // The pid may have been reused; it must at least not be our sleep any more.
            std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()
                != "sleep\u{0}1000\u{0}"
        }
    );
    assert!(!agent.state_dir().join("containers").join(&id).exists());
    let stats =
        agent.client.container_stats(ContainerRef { container_id: id.clone() }).await.unwrap_err();
    assert_eq!(stats.code(), Code::NotFound);
    // Removing again (or an unknown id) is fine.
    agent.client.remove_container(RemoveContainerRequest { container_id: id }).await.unwrap();
}

#[tokio::test]
async fn bad_input_gets_clear_errors() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let containers_dir = agent.state_dir().join("containers");
    let client = &mut agent.client;
    let id = unique_id("bad");

    let mut req = create_request(&id, &["true"], StdioConfig::default(), false);
    req.oci_spec_json = b"{not json".to_vec();
    assert_eq!(client.create_container(req).await.unwrap_err().code(), Code::InvalidArgument);

    let mut req = create_request(&id, &["true"], StdioConfig::default(), false);
    req.rootfs = Some(Rootfs { lower_dirs: vec!["../../etc".into()], read_only: false });
    assert_eq!(client.create_container(req).await.unwrap_err().code(), Code::InvalidArgument);

    let req = create_request("../escape", &["true"], StdioConfig::default(), false);
    assert_eq!(client.create_container(req).await.unwrap_err().code(), Code::InvalidArgument);

    let unknown = ContainerRef { container_id: "nope".into() };
    assert_eq!(client.start_container(unknown.clone()).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(client.container_stats(unknown).await.unwrap_err().code(), Code::NotFound);
    assert_eq!(
        client.wait_process(process_ref("nope", "")).await.unwrap_err().code(),
        Code::NotFound
    );

    client
        .create_container(create_request(&id, &["true"], StdioConfig::default(), false))
        .await
        .unwrap();
    let dup = client
        .create_container(create_request(&id, &["true"], StdioConfig::default(), false))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    let bad_signal = client
        .signal_process(SignalProcessRequest {
            process: Some(process_ref(&id, "")),
            signal: 999,
            all: false,
        })
        .await
        .unwrap_err();
    assert_eq!(bad_signal.code(), Code::InvalidArgument);
    assert_eq!(
        client.wait_process(process_ref(&id, "no-exec")).await.unwrap_err().code(),
        Code::NotFound
    );
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    let twice =
        client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let status = client.wait_process(process_ref(&id, "")).await.unwrap().into_inner();
    assert_eq!(status.exit_code, 0);

    // A program that does not exist fails at create, and leaves nothing behind.
    let id2 = unique_id("noexe");
    let err = client
        .create_container(create_request(
            &id2,
            &["/no/such/program"],
            StdioConfig::default(),
            false,
        ))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert!(!containers_dir.join(&id2).exists());
}

/// CRI's POD PID mode: containers share a PID namespace whose PID 1 is the pause process, and
/// see neither the agent nor anything else outside the pod.
#[tokio::test]
async fn pod_pid_namespace_is_shared_by_its_containers_only() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let client = &mut agent.client;
    let joined = |id: &str, args: &[&str]| {
        let mut req = create_request(id, args, StdioConfig::default(), false);
        req.join_pod_pid_namespace = true;
        req
    };
    // Without a pod namespace, joining one is refused.
    let refused =
        client.create_container(joined(&unique_id("early"), &["true"])).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "sb".into(),
            pod_pid_namespace: true,
            ..Default::default()
        })
        .await
        .unwrap();

    let sleeper = unique_id("sleeper");
    client.create_container(joined(&sleeper, &["sleep", "1000"])).await.unwrap();
    client.start_container(ContainerRef { container_id: sleeper.clone() }).await.unwrap();
    let looker = unique_id("looker");
    let script = "cat /proc/1/comm; for p in /proc/[0-9]*; do cat $p/comm; done | sort | uniq";
    client.create_container(joined(&looker, &["sh", "-c", script])).await.unwrap();
    client.start_container(ContainerRef { container_id: looker.clone() }).await.unwrap();
    let (out, err) = read_all(client, &looker, "").await;
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("pause"), "PID 1 of the pod namespace; stderr: {err}");
    let seen: Vec<&str> = lines.collect();
    assert!(seen.contains(&"sleep"), "the other container's process is visible: {seen:?}");
    assert!(
        !seen.iter().any(|comm| comm.starts_with("podvisor")),
        "the agent is not visible: {seen:?}"
    );
    // A container with its own namespace (CONTAINER mode) is PID 1 there.
    let alone = unique_id("alone");
    client
        .create_container(create_request(
            &alone,
            &["cat", "/proc/1/comm"],
            StdioConfig::default(),
            false,
        ))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: alone.clone() }).await.unwrap();
    assert_eq!(read_all(client, &alone, "").await.0, "cat\n");
    for id in [&sleeper, &looker, &alone] {
        client.remove_container(RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
    }
}

#[tokio::test]
async fn sandbox_files_and_destroy() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let sandbox = agent.state_dir().join("sandbox");
    let client = &mut agent.client;
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "sb".into(),
            hostname: "my-pod".into(),
            dns_servers: vec!["10.96.0.10".into()],
            dns_searches: vec!["default.svc.cluster.local".into()],
            dns_options: vec!["ndots:5".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(std::fs::read_to_string(sandbox.join("hostname")).unwrap(), "my-pod\n");
    assert!(std::fs::read_to_string(sandbox.join("resolv.conf"))
        .unwrap()
        .contains("nameserver 10.96.0.10\n"));
    assert!(std::fs::read_to_string(sandbox.join("hosts")).unwrap().contains("my-pod"));
    let bad = client
        .create_sandbox(CreateSandboxRequest { hostname: "bad name".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    // Shares are checked in host mode too, though not mounted there.
    for (tag, guest_path) in
        [("vol", "/run/podvisor/../etc"), ("vol", "/etc"), ("", "/run/podvisor/v")]
    {
        let share = SharedFs { tag: tag.into(), guest_path: guest_path.into(), read_only: false };
        let bad = client
            .create_sandbox(CreateSandboxRequest {
                sandbox_id: "sb".into(),
                shared_fs: vec![share],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument, "{tag:?} at {guest_path:?}: {bad}");
    }
    let volumes = SharedFs {
        tag: podvisor_proto::VOLUME_FS_TAG.into(),
        guest_path: podvisor_proto::GUEST_VOLUME_DIR.into(),
        read_only: false,
    };
    client
        .create_sandbox(CreateSandboxRequest {
            sandbox_id: "sb".into(),
            hostname: "my-pod".into(),
            shared_fs: vec![volumes],
            ..Default::default()
        })
        .await
        .unwrap();

    let id = unique_id("destroy");
    client
        .create_container(create_request(
            &id,
            &["sh", "-c", "trap '' TERM; while true; do sleep 1; done"],
            StdioConfig::default(),
            false,
        ))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    let stats = client
        .container_stats(ContainerRef { container_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(stats.timestamp_unix_nanos > 0);
    let started = Instant::now();
    client
        .destroy_sandbox(podvisor_proto::agent::DestroySandboxRequest {
            sandbox_id: "sb".into(),
            grace_period_seconds: 1,
        })
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(client.wait_process(process_ref(&id, "")).await.unwrap_err().code(), Code::NotFound);
}

/// Host mode: SetupNetwork checks the request and adds its lines to the sandbox's hosts file
/// (in place, so a container bind-mounting it sees them) but leaves the host's links alone.
#[tokio::test]
async fn setup_network_in_host_mode_writes_the_hosts_file_only() {
    use podvisor_proto::agent::{HostEntry, NetInterface, NetRoute};
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let hosts_path = agent.state_dir().join("sandbox/hosts");
    let client = &mut agent.client;
    let sandbox = CreateSandboxRequest {
        sandbox_id: "sb".into(),
        hostname: "net-pod".into(),
        ..Default::default()
    };
    client.create_sandbox(sandbox.clone()).await.unwrap();

    let id = unique_id("hosts");
    let mut req = create_request(&id, &["sleep", "60"], StdioConfig::default(), false);
    let mut spec: serde_json::Value = serde_json::from_slice(&req.oci_spec_json).unwrap();
    spec["mounts"].as_array_mut().unwrap().push(json!({
        "destination": "/etc/hosts", "type": "bind", "source": hosts_path,
        "options": ["rbind", "ro"]
    }));
    req.oci_spec_json = spec.to_string().into_bytes();
    client.create_container(req).await.unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();

    // No device has this MAC: in host mode nothing looks for it.
    let network = SetupNetworkRequest {
        interfaces: vec![NetInterface {
            mac: "02:42:0a:58:00:05".into(),
            name: "eth0".into(),
            mtu: 1450,
            addresses: vec!["10.88.0.5/16".into()],
        }],
        routes: vec![NetRoute {
            destination: "0.0.0.0/0".into(),
            gateway: "10.88.0.1".into(),
            interface: "eth0".into(),
        }],
        hosts: vec![
            HostEntry { ip: "10.88.0.5".into(), names: vec!["net-pod".into()] },
            HostEntry { ip: "10.88.0.9".into(), names: vec!["db".into(), "db.local".into()] },
        ],
    };
    client.setup_network(network.clone()).await.unwrap();
    let written = std::fs::read_to_string(&hosts_path).unwrap();
    assert!(written.starts_with("127.0.0.1\tlocalhost\n"), "{written}");
    assert!(
        written.ends_with("127.0.1.1\tnet-pod\n10.88.0.5\tnet-pod\n10.88.0.9\tdb db.local\n"),
        "{written}"
    );
    client.exec_process(exec_request(&id, "cat", &["cat", "/etc/hosts"])).await.unwrap();
    let (seen, _) = read_all(client, &id, "cat").await;
    assert_eq!(seen, written);

    // Repeated: the same file, not the lines twice; CreateSandbox again keeps them.
    client.setup_network(network.clone()).await.unwrap();
    assert_eq!(std::fs::read_to_string(&hosts_path).unwrap(), written);
    client.create_sandbox(sandbox).await.unwrap();
    assert_eq!(std::fs::read_to_string(&hosts_path).unwrap(), written);

    // One bad field refuses the whole request, and nothing is written.
    let mut bad = network.clone();
    bad.hosts.push(HostEntry { ip: "10.88.0.10".into(), names: vec!["x".into()] });
    bad.interfaces[0].mac = "02:42:0a:58:00".into();
    let err = client.setup_network(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let mut bad = network;
    bad.routes[0].interface = "eth1".into();
    let err = client.setup_network(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert_eq!(std::fs::read_to_string(&hosts_path).unwrap(), written);

    client.remove_container(RemoveContainerRequest { container_id: id }).await.unwrap();
}

#[tokio::test]
async fn output_is_buffered_without_a_reader_and_one_reader_at_a_time() {
    // Part 1: nothing is lost while no reader is attached (the process blocks instead).
    let Some(()) = prerequisites() else { return };
    {
        let mut agent = TestAgent::start().await;
        let id = unique_id("lossless");
        let client = &mut agent.client;
        client
            .create_container(create_request(
                &id,
                &["sh", "-c", "yes 0123456789 | head -c 3000000; echo end"],
                StdioConfig::default(),
                false,
            ))
            .await
            .unwrap();
        client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (out, _) = read_all(client, &id, "").await;
        assert_eq!(out.len(), 3_000_000 + "end\n".len());
        assert!(out.ends_with("end\n"));
    }
    // Part 2: backpressure and one reader at a time.
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let id = unique_id("buffer");
    let client = &mut agent.client;
    // Far more than the agent buffers: the process must block, not lose output.
    client
        .create_container(create_request(
            &id,
            &["sh", "-c", "yes 0123456789 | head -c 3000000; echo end"],
            StdioConfig::default(),
            false,
        ))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    let mut waiter = client.clone();
    let blocked =
        tokio::time::timeout(Duration::from_millis(500), waiter.wait_process(process_ref(&id, "")))
            .await;
    assert!(blocked.is_err(), "the process should block on its full pipe");

    let mut first = client.read_output(output_of(&id, "")).await.unwrap().into_inner();
    let second = client.read_output(output_of(&id, "")).await.unwrap_err();
    assert_eq!(second.code(), Code::FailedPrecondition);
    // Read some, then detach as a broken stream would: what was sent but not read here is
    // what a host loses when its connection drops. Re-attaching with the offsets it has must
    // give exactly the rest: nothing lost, nothing repeated.
    let mut received = Vec::new();
    while received.len() < 200_000 {
        let chunk = first.message().await.unwrap().expect("output ended early");
        assert_eq!(chunk.offset, received.len() as u64, "chunks arrive in order");
        received.extend_from_slice(&chunk.data);
    }
    drop(first);
    // Beyond what the process wrote is refused.
    let mut ahead = output_of(&id, "");
    ahead.stdout_offset = u64::MAX;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match client.read_output(ahead.clone()).await {
            Err(e) if e.code() == Code::OutOfRange => break,
            Err(e) if e.code() == Code::FailedPrecondition && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("an offset past the end should be OutOfRange: {:?}", other.err()),
        }
    }
    let mut resume = output_of(&id, "");
    resume.stdout_offset = received.len() as u64;
    let mut reader = client.read_output(resume).await.unwrap().into_inner();
    while let Some(chunk) = reader.message().await.unwrap() {
        assert_eq!(chunk.offset, received.len() as u64, "no gap and no repeat");
        received.extend_from_slice(&chunk.data);
    }
    assert_eq!(received.len(), 3_000_000 + "end\n".len());
    assert!(received.ends_with(b"end\n"));
    let status = client.wait_process(process_ref(&id, "")).await.unwrap().into_inner();
    assert_eq!(status.exit_code, 0);
}

/// Host-mode share of the resource RPCs (the host's cgroup2 has no cpu or memory controller;
/// limits and OOM are covered by the guest-mode test): errors, a unified write, the writable
/// layer's figures and SandboxStats.
#[tokio::test]
async fn update_container_and_stats() {
    let Some(()) = prerequisites() else { return };
    let mut agent = TestAgent::start().await;
    let client = &mut agent.client;
    let update = |id: &str, json: &str| UpdateContainerRequest {
        container_id: id.to_string(),
        resources_json: json.as_bytes().to_vec(),
    };
    let unknown = client.update_container(update("nope", "{}")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound, "{unknown}");

    let id = unique_id("update");
    client
        .create_container(create_request(&id, &["sleep", "1000"], StdioConfig::default(), false))
        .await
        .unwrap();
    client.start_container(ContainerRef { container_id: id.clone() }).await.unwrap();
    for bad in
        ["{not json", r#"{"unified": {"../../cgroup.procs": "1"}}"#, r#"{"memory": {"swap": 5}}"#]
    {
        let err = client.update_container(update(&id, bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}: {err}");
    }
    // No cpu controller here: the refused write names its file.
    let err =
        client.update_container(update(&id, r#"{"cpu": {"shares": 512}}"#)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("cpu.weight"), "{err}");
    // Every cgroup2 directory has the cgroup.* core files: a unified write lands there.
    client
        .update_container(update(&id, r#"{"unified": {"cgroup.max.depth": "3"}}"#))
        .await
        .unwrap();
    let depth =
        std::fs::read_to_string(format!("/sys/fs/cgroup/unified/podvisor/{id}/cgroup.max.depth"))
            .unwrap();
    assert_eq!(depth.trim(), "3");
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir().join("containers").join(&id).join("config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["linux"]["resources"]["unified"]["cgroup.max.depth"], "3", "remembered");

    // The writable layer grows by what the container writes.
    let client = &mut agent.client;
    let before = client
        .container_stats(ContainerRef { container_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    client
        .exec_process(exec_request(&id, "w", &["sh", "-c", "head -c 1048576 /dev/zero > /big"]))
        .await
        .unwrap();
    read_all(client, &id, "w").await;
    assert_eq!(client.wait_process(process_ref(&id, "w")).await.unwrap().into_inner().exit_code, 0);
    let after = client
        .container_stats(ContainerRef { container_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    eprintln!(
        "writable layer: {} B / {} inodes -> {} B / {} inodes",
        before.writable_layer_bytes,
        before.writable_layer_inodes,
        after.writable_layer_bytes,
        after.writable_layer_inodes
    );
    assert!(after.writable_layer_bytes >= before.writable_layer_bytes + (1 << 20), "{after:?}");
    assert!(after.writable_layer_inodes > before.writable_layer_inodes, "{after:?}");

    let sandbox = client.sandbox_stats(Empty {}).await.unwrap().into_inner();
    eprintln!("sandbox stats (host mode): {sandbox:?}");
    assert!(sandbox.memory_total_bytes > 0, "{sandbox:?}");
    assert!(sandbox.memory_available_bytes > 0, "{sandbox:?}");
    assert!(sandbox.memory_available_bytes <= sandbox.memory_total_bytes, "{sandbox:?}");
    assert!(sandbox.timestamp_unix_nanos > 0);

    // A stopped container cannot be updated; an ordinary exit was no OOM kill.
    client.remove_container(RemoveContainerRequest { container_id: id.clone() }).await.unwrap();
    let stopped = unique_id("stopped");
    let (_, _, code) = run_container(&mut agent, &stopped, &["true"], false).await;
    assert_eq!(code, 0);
    let client = &mut agent.client;
    let status = client.wait_process(process_ref(&stopped, "")).await.unwrap().into_inner();
    assert!(!status.oom_killed);
    let err = client.update_container(update(&stopped, "{}")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
}
