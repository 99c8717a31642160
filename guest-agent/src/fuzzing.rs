//! Entry points for the fuzz crate (`fuzz/`): a request body as the host
//! sends it (gRPC length-prefixed messages) through tonic's decoding into the agent's request
//! types, then every check the agent makes before it acts on one. Nothing is dispatched: no
//! container is created, no file outside a scratch directory is written.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use futures::StreamExt;
use nix::sys::signal::Signal;
use podvisor_proto::agent as pb;
use tonic::codec::{Codec, Streaming};
use tonic::Status;

use crate::container::{validate_id, AgentError};

/// tonic's default decoding limit, which the agent's server keeps.
const MAX_MESSAGE: usize = 4 << 20;

/// One request body; its first byte picks the method it is sent to.
pub fn request(data: &[u8]) {
    let Some((&method, body)) = data.split_first() else { return };
    match method % 6 {
        0 => decode::<pb::CreateContainerRequest>(body).iter().for_each(create_container),
        1 => decode::<pb::ExecProcessRequest>(body).iter().for_each(exec_process),
        2 => decode::<pb::UpdateContainerRequest>(body).iter().for_each(update_container),
        3 => decode::<pb::SetupNetworkRequest>(body).iter().for_each(setup_network),
        4 => decode::<pb::CreateSandboxRequest>(body).iter().for_each(create_sandbox),
        _ => decode::<pb::SignalProcessRequest>(body).iter().for_each(signal_process),
    }
}

/// The messages tonic's server decoding yields from `body`, up to its first error.
fn decode<M: prost::Message + Default + Send + 'static>(body: &[u8]) -> Vec<M> {
    let body =
        tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::copy_from_slice(body)));
    let decoder = tonic_prost::ProstCodec::<M, M>::default().decoder();
    let mut stream = Streaming::new_request(decoder, body, None, Some(MAX_MESSAGE));
    futures::executor::block_on(async {
        let mut messages = Vec::new();
        while let Some(Ok(message)) = stream.next().await {
            messages.push(message);
        }
        messages
    })
}

/// A scratch shared directory with one layer, for the rootfs checks.
fn shared_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("podvisor-agent-fuzz-{}", std::process::id()));
        let _ = std::fs::create_dir_all(dir.join("layers/0"));
        dir
    })
}

/// Every error becomes the status the host would get.
fn answer(result: Result<(), AgentError>) {
    if let Err(e) = result {
        let status = Status::from(e);
        assert!(status.code() != tonic::Code::Ok, "an error answered OK: {status:?}");
    }
}

fn create_container(req: &pb::CreateContainerRequest) {
    answer((|| {
        validate_id("container id", &req.container_id)?;
        let spec: oci_spec::runtime::Spec =
            serde_json::from_slice(&req.oci_spec_json).map_err(AgentError::BadSpec)?;
        spec.process().as_ref().ok_or(AgentError::NoProcess)?;
        let rootfs = req.rootfs.as_ref().ok_or(AgentError::NoRootfs)?;
        let lowers = crate::rootfs::validate(shared_dir(), &rootfs.lower_dirs)?;
        assert!(
            lowers.iter().all(|l| l.starts_with(shared_dir())),
            "a lower dir escapes: {lowers:?}"
        );
        for d in &req.devices {
            // Names a guest path only: the guest's /dev decides whether it exists.
            let _ = crate::devices::named_device(
                Path::new(&d.guest_path),
                Path::new(&d.container_path),
            );
        }
        Ok(())
    })());
}

fn exec_process(req: &pb::ExecProcessRequest) {
    answer((|| {
        validate_id("container id", &req.container_id)?;
        validate_id("exec id", &req.exec_id)?;
        let _: oci_spec::runtime::Process =
            serde_json::from_slice(&req.oci_process_json).map_err(AgentError::BadProcess)?;
        Ok(())
    })());
}

fn update_container(req: &pb::UpdateContainerRequest) {
    answer((|| {
        validate_id("container id", &req.container_id)?;
        crate::cgroup::Update::from_json(&req.resources_json)?;
        Ok(())
    })());
}

fn setup_network(req: &pb::SetupNetworkRequest) {
    if let Ok(plan) = crate::network::Plan::from_request(req) {
        let lines = crate::network::host_lines(&plan.hosts);
        assert!(lines.is_empty() || lines.ends_with('\n'), "a hosts line is unterminated");
    }
}

fn create_sandbox(req: &pb::CreateSandboxRequest) {
    if crate::sandbox::check(req, shared_dir()).is_ok() {
        let hosts = crate::sandbox::hosts_file(&req.hostname);
        let resolv = crate::sandbox::resolv_conf(req);
        // A checked request cannot add lines of its own to the files it writes.
        let base = crate::sandbox::hosts_file("").lines().count();
        assert_eq!(hosts.lines().count(), base + usize::from(!req.hostname.is_empty()));
        let entries = req.dns_servers.len()
            + usize::from(!req.dns_searches.is_empty())
            + usize::from(!req.dns_options.is_empty());
        assert!(resolv.lines().count() <= entries, "resolv.conf {resolv:?}");
    }
}

fn signal_process(req: &pb::SignalProcessRequest) {
    answer(Signal::try_from(req.signal).map(drop).map_err(|_| AgentError::BadSignal(req.signal)));
}

/// The seeds of `fuzz/corpus/agent_request`: a request of each method, framed as the host
/// sends it. `PODVISOR_WRITE_FUZZ_SEEDS=<dir> cargo test -p podvisor-agent
/// seeds` rewrites them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use prost::Message;
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["/bin/sh"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}
    });
    let process = spec["process"].clone();
    let stdio = Some(pb::StdioConfig { stdin: true, stdin_once: false, tty: false });
    let frame = |method: u8, message: &dyn Fn(&mut Vec<u8>)| {
        let mut body = Vec::new();
        message(&mut body);
        let mut out = vec![method, 0];
        out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&body);
        out
    };
    let create = pb::CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec_json: spec.to_string().into_bytes(),
        rootfs: Some(pb::Rootfs { lower_dirs: vec!["layers/0".into()], read_only: false }),
        stdio,
        join_pod_pid_namespace: true,
        privileged: false,
        devices: vec![pb::GuestDevice {
            guest_path: "/dev/vdb".into(),
            container_path: "/dev/xvda".into(),
            permissions: "rw".into(),
        }],
    };
    let exec = pb::ExecProcessRequest {
        container_id: "c1".into(),
        exec_id: "e1".into(),
        oci_process_json: process.to_string().into_bytes(),
        stdio,
    };
    let update = pb::UpdateContainerRequest {
        container_id: "c1".into(),
        resources_json:
            br#"{"memory":{"limit":67108864},"cpu":{"shares":512,"quota":50000,"period":100000}}"#
                .to_vec(),
    };
    let network = pb::SetupNetworkRequest {
        interfaces: vec![pb::NetInterface {
            mac: "02:42:0a:58:00:05".into(),
            name: "eth0".into(),
            mtu: 1500,
            addresses: vec!["10.88.0.5/16".into(), "fd00:10::5/64".into()],
        }],
        routes: vec![pb::NetRoute {
            destination: "0.0.0.0/0".into(),
            gateway: "10.88.0.1".into(),
            interface: "eth0".into(),
        }],
        hosts: vec![pb::HostEntry { ip: "10.88.0.5".into(), names: vec!["pod".into()] }],
    };
    let sandbox = pb::CreateSandboxRequest {
        sandbox_id: "s1".into(),
        hostname: "pod".into(),
        dns_servers: vec!["10.96.0.10".into()],
        dns_searches: vec!["default.svc.cluster.local".into()],
        dns_options: vec!["ndots:5".into()],
        sysctls: [("net.ipv4.ip_forward".to_string(), "1".to_string())].into(),
        mount_shared_fs: true,
        shared_fs: vec![pb::SharedFs {
            tag: "podvisor".into(),
            guest_path: "/run/podvisor/shared".into(),
            read_only: false,
        }],
        ..Default::default()
    };
    let signal = pb::SignalProcessRequest {
        process: Some(pb::ProcessRef { container_id: "c1".into(), exec_id: String::new() }),
        signal: 15,
        all: true,
    };
    vec![
        ("create_container", frame(0, &|b| create.encode(b).unwrap_or_default())),
        ("exec_process", frame(1, &|b| exec.encode(b).unwrap_or_default())),
        ("update_container", frame(2, &|b| update.encode(b).unwrap_or_default())),
        ("setup_network", frame(3, &|b| network.encode(b).unwrap_or_default())),
        ("create_sandbox", frame(4, &|b| sandbox.encode(b).unwrap_or_default())),
        ("signal_process", frame(5, &|b| signal.encode(b).unwrap_or_default())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each seed decodes into one message that passes the agent's checks, so the fuzzer
    /// starts from requests the agent accepts.
    #[test]
    fn seeds() {
        for (name, seed) in super::seeds() {
            let (&method, body) = seed.split_first().unwrap();
            assert!(!body.is_empty(), "{name}");
            request(&seed);
            let accepted = match method {
                0 => decode::<pb::CreateContainerRequest>(body).len(),
                1 => decode::<pb::ExecProcessRequest>(body).len(),
                2 => decode::<pb::UpdateContainerRequest>(body).len(),
                3 => decode::<pb::SetupNetworkRequest>(body)
                    .iter()
                    .filter(|r| crate::network::Plan::from_request(r).is_ok())
                    .count(),
                4 => decode::<pb::CreateSandboxRequest>(body)
                    .iter()
                    .filter(|r| crate::sandbox::check(r, shared_dir()).is_ok())
                    .count(),
                _ => decode::<pb::SignalProcessRequest>(body).len(),
            };
            assert_eq!(accepted, 1, "{name}");
            if let Some(dir) = std::env::var_os("PODVISOR_WRITE_FUZZ_SEEDS") {
                std::fs::write(Path::new(&dir).join(name), &seed).unwrap();
            }
        }
    }
}
