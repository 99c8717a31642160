//! End-to-end: Exec, Attach and PortForward through the daemon's streaming URLs over
//! WebSocket (`crictl --transport websocket`), all on one pod: `v5.channel.k8s.io` with stdin
//! and its half-close, stdout, stderr and the exit code in the status; `v4.channel.k8s.io`
//! with a long output that must arrive whole; a terminal with a resize that `stty size` sees;
//! an interactive shell ending with stdin open; attach; malformed client messages; a client
//! that hangs up mid-command; port-forward over `SPDY/3.1+portforward.k8s.io`; and, with
//! clients this project did not write, the exec and kubelet's `v4.channel.k8s.io`
//! port-forward driven by PyPI's `kubernetes` package, and (where `PODVISOR_CRICTL` names one)
//! `crictl exec` / `port-forward --transport websocket`.

use std::time::Duration;

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, wait_for, TestDaemon};
use podvisor_e2e::registry::TestRegistry;
use podvisor_e2e::streaming::{read_all, Channels, PortForward};
use podvisor_e2e::streaming_ws::{k8s_client, k8s_python, WsRemoteCommand};
use tokio_tungstenite::tungstenite::Message;

const TIMEOUT: Duration = Duration::from_secs(60);
const V5: &str = "v5.channel.k8s.io";
const V4: &str = "v4.channel.k8s.io";
/// The Python clients in tests/clients, on PyPI's kubernetes package.
const EXEC_CLIENT: &str = "k8s_ws_exec.py";
const PORT_FORWARD_CLIENT: &str = "k8s_ws_portforward.py";

async fn exec_url(daemon: &TestDaemon, cid: &str, cmd: &[&str], c: Channels) -> String {
    let mut rt = daemon.runtime().await.unwrap();
    rt.exec(cri::ExecRequest {
        container_id: cid.into(),
        cmd: cmd.iter().map(|s| s.to_string()).collect(),
        tty: c.tty,
        stdin: c.stdin,
        stdout: c.stdout,
        stderr: c.stderr,
    })
    .await
    .unwrap_or_else(|e| panic!("Exec: {e}"))
    .into_inner()
    .url
}

async fn port_forward_url(daemon: &TestDaemon, pod: &str) -> String {
    let mut rt = daemon.runtime().await.unwrap();
    rt.port_forward(cri::PortForwardRequest { pod_sandbox_id: pod.into(), port: vec![] })
        .await
        .unwrap()
        .into_inner()
        .url
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_attach_and_port_forward_over_websocket() {
    if !e2e_can_run() {
        return;
    }
    // Fails, not skips, under PODVISOR_REQUIRE_E2E=1: `make deps` installs the client.
    let python = k8s_python();
    if std::env::var("PODVISOR_REQUIRE_E2E").as_deref() == Ok("1") {
        if let Err(e) = &python {
            panic!("the kubernetes Python client is missing: {e:#}");
        }
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:websocket").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, pod_cfg) = daemon.run_pod("websocket", &log_dir).await;
    let mut echo =
        container_config("echo", &image, &["sh", "-c", "while read l; do echo echo:$l; done"]);
    echo.stdin = true;
    let cid = daemon.create_and_start(&pod, &pod_cfg, echo).await;
    // Echo servers for port-forward; busybox nc serves one connection at a time.
    for port in ["8080", "8081"] {
        let server = container_config(
            &format!("echo-{port}"),
            &image,
            &["nc", "-ll", "-p", port, "-e", "cat"],
        );
        daemon.create_and_start(&pod, &pod_cfg, server).await;
    }
    let baseline = daemon.agent_figures(&pod).await.0;

    // v5: stdin in and half-closed (cat ends only at EOF), stdout, stderr, the exit code.
    // Malformed and unknown messages first: they are dropped, the session goes on.
    let plain = Channels { stdin: true, stdout: true, stderr: true, tty: false };
    let cmd = ["sh", "-c", "cat; echo done >&2; exit 3"];
    let url = exec_url(&daemon, &cid, &cmd, plain).await;
    let mut session = WsRemoteCommand::connect(&url, V5).await.unwrap();
    assert_eq!(session.protocol, V5);
    session.send_raw(Message::Binary(Vec::new().into())).await.unwrap();
    session.send(9, b"no such channel").await.unwrap();
    session.send(4, b"{not json").await.unwrap();
    session.send(255, &[7]).await.unwrap();
    session.stdin(b"hello\n").await.unwrap();
    session.stdin(b"world\n").await.unwrap();
    session.close_stdin().await.unwrap();
    let done = session.finish(TIMEOUT).await.unwrap();
    assert_eq!(text(&done.stdout), "hello\nworld\n");
    assert_eq!(text(&done.stderr), "done\n");
    assert_eq!(done.exit_code(), Some(3), "status {}", done.status);

    // A token is good once.
    let reused = WsRemoteCommand::connect(&url, V5).await.err().expect("a second connection");
    assert!(reused.to_string().contains("404"), "{reused}");

    // v4, and a clean end that loses nothing in flight: the whole of a long output.
    let quiet = Channels { stdin: false, stdout: true, stderr: true, tty: false };
    let url = exec_url(&daemon, &cid, &["seq", "1", "30000"], quiet).await;
    let session = WsRemoteCommand::connect(&url, V4).await.unwrap();
    assert_eq!(session.protocol, V4);
    let done = session.finish(TIMEOUT).await.unwrap();
    let expected: String = (1..=30000).map(|n| format!("{n}\n")).collect();
    assert!(text(&done.stdout) == expected, "{} bytes of {}", done.stdout.len(), expected.len());
    assert_eq!(done.exit_code(), Some(0), "status {}", done.status);

    // A terminal: the resize reaches it before the command reads its size.
    let tty = Channels { stdin: false, stdout: true, stderr: false, tty: true };
    let url = exec_url(&daemon, &cid, &["sh", "-c", "sleep 1; stty size"], tty).await;
    let mut session = WsRemoteCommand::connect(&url, V5).await.unwrap();
    session.resize(100, 30).await.unwrap();
    let done = session.finish(TIMEOUT).await.unwrap();
    assert!(text(&done.stdout).contains("30 100"), "{:?} status {}", done.stdout, done.status);
    assert_eq!(done.exit_code(), Some(0));

    // An interactive shell on a terminal ends when it exits, with stdin still open.
    let interactive = Channels { stdin: true, stdout: true, stderr: false, tty: true };
    let url = exec_url(&daemon, &cid, &["sh"], interactive).await;
    let mut session = WsRemoteCommand::connect(&url, V5).await.unwrap();
    session.stdin(b"echo hi-$((40+2))\n").await.unwrap();
    let seen = session.read_stdout_until("hi-42", TIMEOUT).await.unwrap();
    assert!(text(&seen).contains("hi-42"), "{:?}", text(&seen));
    session.stdin(b"exit 7\n").await.unwrap();
    let done = session.finish(TIMEOUT).await.unwrap();
    assert_eq!(done.exit_code(), Some(7), "status {}", done.status);

    // Attach: the container's own stdin and output; the client leaving ends only its session.
    let mut rt = daemon.runtime().await.unwrap();
    let url = rt
        .attach(cri::AttachRequest {
            container_id: cid.clone(),
            stdin: true,
            tty: false,
            stdout: true,
            stderr: true,
        })
        .await
        .unwrap()
        .into_inner()
        .url;
    let mut session = WsRemoteCommand::connect(&url, V5).await.unwrap();
    session.stdin(b"ping\n").await.unwrap();
    let seen = session.read_stdout_until("echo:ping", TIMEOUT).await.unwrap();
    assert!(text(&seen).contains("echo:ping"), "{seen:?}");
    session.close().await.unwrap();
    assert_eq!(
        daemon.container_status(&cid).await.state,
        cri::ContainerState::ContainerRunning as i32
    );

    // A client that hangs up mid-command leaves nothing running in the guest.
    let url = exec_url(&daemon, &cid, &["sleep", "1000"], quiet).await;
    let session = WsRemoteCommand::connect(&url, V5).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(session);
    let settled = wait_for(TIMEOUT, || async {
        (daemon.agent_figures(&pod).await.0 == baseline).then_some(())
    })
    .await;
    assert!(settled.is_some(), "the abandoned exec was left in the guest");

    // PyPI's kubernetes client: v5 (its first choice) with stdin closed, then v4.
    match &python {
        Ok(python) => {
            let cmd = ["sh", "-c", "cat; echo from-stderr >&2; exit 5"];
            let url = exec_url(&daemon, &cid, &cmd, plain).await;
            let args = ["--stdin", "from-python\n"];
            let got = k8s_client(python, EXEC_CLIENT, &url, &args).await.unwrap();
            assert_eq!(got["subprotocol"], V5, "{got}");
            assert_eq!(got["stdout"], "from-python\n", "{got}");
            assert_eq!(got["stderr"], "from-stderr\n", "{got}");
            assert_eq!(got["returncode"], 5, "{got}");

            let url = exec_url(&daemon, &cid, &["sh", "-c", "sleep 1; stty size"], tty).await;
            let got =
                k8s_client(python, EXEC_CLIENT, &url, &["--protocol", V4, "--resize", "90x20"])
                    .await
                    .unwrap();
            assert_eq!(got["subprotocol"], V4, "{got}");
            assert!(got["stdout"].as_str().unwrap_or_default().contains("20 90"), "{got}");
            assert_eq!(got["returncode"], 0, "{got}");
        }
        Err(e) => eprintln!("skipped the kubernetes Python client: {e:#}"),
    }

    // crictl's own WebSocket transport (client-go's v5 executor), where one is given.
    if let Some(crictl) = std::env::var_os("PODVISOR_CRICTL") {
        let endpoint = format!("unix://{}", daemon.socket().display());
        let mut child = tokio::process::Command::new(crictl)
            .args(["--runtime-endpoint", &endpoint, "exec", "--transport", "websocket", "-i"])
            .args([cid.as_str(), "sh", "-c", "cat; echo crictl-err >&2; exit 4"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut stdin, b"via-crictl\n").await.unwrap();
        drop(stdin);
        let out = tokio::time::timeout(TIMEOUT, child.wait_with_output()).await.unwrap().unwrap();
        assert_eq!(text(&out.stdout), "via-crictl\n", "crictl: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("crictl-err"), "{}", text(&out.stderr));
        // crictl reports a command's failure and exits 1 itself.
        assert!(text(&out.stderr).contains("exit code 4"), "{}", text(&out.stderr));
        assert!(!out.status.success());
    }

    // Port-forward over SPDY-over-WebSocket: two connections at once, 1 MiB each way.
    let mut first =
        PortForward::connect_websocket(&port_forward_url(&daemon, &pod).await).await.unwrap();
    for port in [8080, 8081] {
        let mut ready = false;
        for _ in 0..100 {
            let echoed = first.round_trip(port, b"probe\n").await.unwrap_or_default();
            if echoed == b"probe\n" {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(ready, "the echo server on {port} never answered through the forward");
    }
    let mut second =
        PortForward::connect_websocket(&port_forward_url(&daemon, &pod).await).await.unwrap();
    let payload = |seed: u8| -> Vec<u8> {
        (0..1024 * 1024u32).map(|i| (i.wrapping_mul(31) as u8) ^ seed).collect()
    };
    let (a, b) = (payload(1), payload(2));
    let started = std::time::Instant::now();
    let (got_a, got_b) = tokio::join!(first.round_trip(8080, &a), second.round_trip(8081, &b));
    println!("2 x 1 MiB echoed through port-forward over WebSocket in {:?}", started.elapsed());
    let (got_a, got_b) = (got_a.unwrap(), got_b.unwrap());
    assert!(got_a == a, "connection A: {} bytes back, not identical", got_a.len());
    assert!(got_b == b, "connection B: {} bytes back, not identical", got_b.len());
    // Nothing listens on port 9: the error stream says so.
    let (mut error, mut data) = first.open(9).await.unwrap();
    let (message, _) = tokio::join!(read_all(&mut error), read_all(&mut data));
    assert!(text(&message).contains("error forwarding port 9"), "{:?}", text(&message));
    first.close().await;
    second.close().await;

    // kubelet's older WebSocket port-forward (v4.channel.k8s.io, ports in the query), with
    // PyPI's kubernetes client: two ports at once and a refused one.
    if let Ok(python) = &python {
        let url = port_forward_url(&daemon, &pod).await;
        let args = ["8080", "8081", "--refused", "9"];
        let got = k8s_client(python, PORT_FORWARD_CLIENT, &url, &args).await.unwrap();
        assert_eq!(got["subprotocol"], V4, "{got}");
        assert_eq!(got["echoed"]["8080"], true, "{got}");
        assert_eq!(got["echoed"]["8081"], true, "{got}");
        assert_eq!(got["refused_eof"], true, "{got}");
        let error = got["refused_error"].as_str().unwrap_or_default();
        assert!(error.contains("error forwarding port 9"), "{got}");
    }

    // crictl's SPDY-over-WebSocket dialer (client-go's), where one is given.
    if let Some(crictl) = std::env::var_os("PODVISOR_CRICTL") {
        crictl_port_forward(&crictl, &daemon, &pod).await;
    }

    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}

/// `crictl port-forward --transport websocket POD 0:8080`, then a round trip through the
/// local port it opens.
async fn crictl_port_forward(crictl: &std::ffi::OsStr, daemon: &TestDaemon, pod: &str) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let endpoint = format!("unix://{}", daemon.socket().display());
    let mut child = tokio::process::Command::new(crictl)
        .args(["--runtime-endpoint", &endpoint, "port-forward", "--transport", "websocket"])
        .args([pod, "0:8080"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let local = tokio::time::timeout(TIMEOUT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            // "Forwarding from 127.0.0.1:PORT -> 8080"
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                return rest.split_whitespace().next().map(String::from);
            }
        }
        None
    })
    .await
    .unwrap()
    .expect("crictl port-forward said where it listens");
    let mut conn = tokio::net::TcpStream::connect(format!("127.0.0.1:{local}")).await.unwrap();
    let payload: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8).collect();
    let (mut from, mut to) = conn.split();
    let send = async { to.write_all(&payload).await.unwrap() };
    let receive = async {
        let mut got = vec![0u8; payload.len()];
        from.read_exact(&mut got).await.map(|_| got)
    };
    let ((), got) = tokio::time::timeout(TIMEOUT, async { tokio::join!(send, receive) })
        .await
        .expect("the echo through crictl's forward");
    assert!(got.unwrap() == payload, "crictl's forward changed the bytes");
    let _ = child.kill().await;
}
