//! End-to-end: Exec and Attach through the daemon's streaming URL, over SPDY/3.1 with the
//! remotecommand protocol, on a real guest: stdin/stdout/stderr and the exit code, a terminal
//! with a resize that `stty size` sees, an interactive shell that ends when it exits, attach
//! next to the log writer, single-use tokens, and a client that hangs up mid-command.

use std::time::Duration;

use k8s_cri::v1 as cri;
use podvisor_e2e::daemon::{container_config, e2e_can_run, wait_for, TestDaemon};
use podvisor_e2e::registry::TestRegistry;
use podvisor_e2e::streaming::{read_all, upgrade, Channels, PortForward, RemoteCommand};

const TIMEOUT: Duration = Duration::from_secs(60);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_attach_over_spdy() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:streaming").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, pod_cfg) = daemon.run_pod("streaming", &log_dir).await;
    let mut echo =
        container_config("echo", &image, &["sh", "-c", "while read l; do echo echo:$l; done"]);
    echo.stdin = true;
    let cid = daemon.create_and_start(&pod, &pod_cfg, echo).await;
    let baseline = daemon.agent_figures(&pod).await.0;

    // stdin in, stdout and stderr out, the exit code on the error channel.
    let plain = Channels { stdin: true, stdout: true, stderr: true, tty: false };
    let url = exec_url(
        &daemon,
        &cid,
        &["sh", "-c", "read line; echo got:$line; echo oops >&2; exit 3"],
        plain,
    )
    .await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let session = RemoteCommand::connect(&url, plain).await.unwrap();
    assert_eq!(session.protocol, "v5.channel.k8s.io");
    let stdin = session.stdin.clone().unwrap();
    stdin.write(b"hello\n").await.unwrap();
    stdin.close().await.unwrap();
    let done = session.finish(TIMEOUT).await.unwrap();
    assert_eq!(String::from_utf8_lossy(&done.stdout), "got:hello\n");
    assert_eq!(String::from_utf8_lossy(&done.stderr), "oops\n");
    assert_eq!(done.exit_code(), Some(3), "status {}", done.status);

    // A token is good once.
    let reused = upgrade(&url, &["v4.channel.k8s.io"]).await.unwrap_err();
    assert!(reused.to_string().contains("404"), "{reused}");

    // A terminal: the resize reaches it before the command reads its size.
    let tty = Channels { stdin: false, stdout: true, stderr: false, tty: true };
    let url = exec_url(&daemon, &cid, &["sh", "-c", "sleep 1; stty size"], tty).await;
    let session = RemoteCommand::connect(&url, tty).await.unwrap();
    session.resize(100, 30).await.unwrap();
    let done = session.finish(TIMEOUT).await.unwrap();
    assert!(
        String::from_utf8_lossy(&done.stdout).contains("30 100"),
        "{:?} status {}",
        done.stdout,
        done.status
    );
    assert_eq!(done.exit_code(), Some(0));

    // An interactive shell on a terminal ends when it exits, with stdin still open.
    let interactive = Channels { stdin: true, stdout: true, stderr: false, tty: true };
    let url = exec_url(&daemon, &cid, &["sh"], interactive).await;
    let mut session = RemoteCommand::connect(&url, interactive).await.unwrap();
    let stdin = session.stdin.clone().unwrap();
    stdin.write(b"echo hi-$((40+2))\n").await.unwrap();
    let seen = session.read_stdout_until("hi-42", TIMEOUT).await.unwrap();
    assert!(
        String::from_utf8_lossy(&seen).contains("hi-42"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    stdin.write(b"exit 7\n").await.unwrap();
    let done = session.finish(TIMEOUT).await.unwrap();
    assert_eq!(done.exit_code(), Some(7), "status {}", done.status);

    // Attach: the container's own stdin and output, which its log also gets.
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
    let mut session = RemoteCommand::connect(&url, plain).await.unwrap();
    session.stdin.as_ref().unwrap().write(b"ping\n").await.unwrap();
    let seen = session.read_stdout_until("echo:ping", TIMEOUT).await.unwrap();
    assert!(String::from_utf8_lossy(&seen).contains("echo:ping"), "{seen:?}");
    session.session.close().await;
    let log = wait_for(TIMEOUT, || async {
        let log = std::fs::read_to_string(log_dir.join("echo.log")).unwrap_or_default();
        log.contains("echo:ping").then_some(log)
    })
    .await;
    assert!(log.is_some(), "the log writer missed what attach saw");
    assert_eq!(
        daemon.container_status(&cid).await.state,
        cri::ContainerState::ContainerRunning as i32
    );

    // A client that hangs up mid-command leaves nothing running in the guest.
    let quiet = Channels { stdin: false, stdout: true, stderr: true, tty: false };
    let url = exec_url(&daemon, &cid, &["sleep", "1000"], quiet).await;
    let session = RemoteCommand::connect(&url, quiet).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    session.session.close().await;
    let settled = wait_for(TIMEOUT, || async {
        (daemon.agent_figures(&pod).await.0 == baseline).then_some(())
    })
    .await;
    assert!(settled.is_some(), "the abandoned exec was left in the guest");

    // Bad requests get the right codes.
    let stopped = rt
        .exec(cri::ExecRequest {
            container_id: "nope".into(),
            cmd: vec!["true".into()],
            stdout: true,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(stopped.code(), tonic::Code::NotFound, "{stopped}");
    let no_streams = rt
        .exec(cri::ExecRequest {
            container_id: cid.clone(),
            cmd: vec!["true".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(no_streams.code(), tonic::Code::InvalidArgument, "{no_streams}");

    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}

/// Port-forward to a server on localhost inside the guest: two connections at once, 1 MiB
/// each way, bytes identical; a port nothing listens on is reported on the error stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_over_spdy() {
    if !e2e_can_run() {
        return;
    }
    let registry = TestRegistry::start().unwrap();
    let image = registry.push_busybox("busybox:forward").unwrap();
    let daemon = TestDaemon::start("").await.unwrap();
    daemon.pull(&image).await;
    let log_dir = daemon.dir.path().join("pod-logs");
    let (pod, pod_cfg) = daemon.run_pod("forward", &log_dir).await;
    // An echo server on localhost:8080 in the pod: one `cat` per connection.
    // busybox nc serves one connection at a time: one server per parallel connection.
    for port in ["8080", "8081"] {
        let server = container_config(
            &format!("echo-{port}"),
            &image,
            &["nc", "-ll", "-p", port, "-e", "cat"],
        );
        daemon.create_and_start(&pod, &pod_cfg, server).await;
    }
    let mut rt = daemon.runtime().await.unwrap();
    let url = rt
        .port_forward(cri::PortForwardRequest { pod_sandbox_id: pod.clone(), port: vec![] })
        .await
        .unwrap()
        .into_inner()
        .url;
    assert!(url.contains("/portforward/"), "{url}");
    let mut forward = PortForward::connect(&url).await.unwrap();
    // The server may still be starting: retry until it answers.
    for port in [8080, 8081] {
        let mut ready = false;
        for _ in 0..100 {
            let echoed = forward.round_trip(port, b"probe\n").await.unwrap_or_default();
            if echoed == b"probe\n" {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(ready, "the echo server on {port} never answered through the forward");
    }

    let payload = |seed: u8| -> Vec<u8> {
        (0..1024 * 1024u32).map(|i| (i.wrapping_mul(31) as u8) ^ seed).collect()
    };
    let (a, b) = (payload(1), payload(2));
    let mut second = {
        let url = rt
            .port_forward(cri::PortForwardRequest { pod_sandbox_id: pod.clone(), port: vec![] })
            .await
            .unwrap()
            .into_inner()
            .url;
        PortForward::connect(&url).await.unwrap()
    };
    let started = std::time::Instant::now();
    let (got_a, got_b) = tokio::join!(forward.round_trip(8080, &a), second.round_trip(8081, &b));
    let took = started.elapsed();
    let (got_a, got_b) = (got_a.unwrap(), got_b.unwrap());
    println!("2 x 1 MiB echoed through port-forward in {took:?}");
    assert!(got_a == a, "connection A: {} bytes back, not identical", got_a.len());
    assert!(got_b == b, "connection B: {} bytes back, not identical", got_b.len());

    // Nothing listens on port 9: the error stream says so and the data stream ends.
    let (mut error, mut data) = forward.open(9).await.unwrap();
    let (message, rest) = tokio::join!(read_all(&mut error), read_all(&mut data));
    let message = String::from_utf8_lossy(&message).into_owned();
    assert_eq!(data.reset_status(), Some(5), "the data stream is reset (CANCEL)");
    assert!(message.contains("error forwarding port 9"), "{message:?}");
    assert!(rest.is_empty());
    forward.close().await;
    second.close().await;

    daemon.remove_pod(&pod).await;
    daemon.assert_nothing_left();
}
