//! Entry points for the fuzz crate (`fuzz/`): CRI requests as bytes on
//! the wire, decoded with prost, through the CRI layer's checks and translation and on to the
//! OCI spec the sandbox layer builds from them. Nothing reaches a sandbox manager.

use std::path::{Component, Path, PathBuf};

use k8s_cri::v1 as cri;
use prost::Message;

use super::translate;
use crate::sandbox::spec::{self, GuestMount, ImageDefaults, SandboxContext};
use crate::sandbox::{container::parse_signal, NamespaceMode, SeccompProfile};

/// One request; the first byte picks which.
pub fn request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 3 {
        0 => run_pod_sandbox(body),
        1 => create_container(body),
        _ => update_container_resources(body),
    }
}

fn run_pod_sandbox(body: &[u8]) {
    let Ok(req) = cri::RunPodSandboxRequest::decode(body) else { return };
    let Ok(pod) = translate::pod_spec(req) else { return };
    assert!(pod.hostname.len() <= 64, "hostname {:?}", pod.hostname);
    assert!(!pod.metadata.name.is_empty() && !pod.metadata.namespace.is_empty());
}

fn create_container(body: &[u8]) {
    let Ok(req) = cri::CreateContainerRequest::decode(body) else { return };
    if let Some(sandbox) = req.sandbox_config.as_ref().and_then(|c| c.linux.as_ref()) {
        let _ = translate::pod_demand_of(sandbox.resources.as_ref(), sandbox.overhead.as_ref());
    }
    let Some(config) = req.config else { return };
    let Ok(mut container) = translate::container_spec_with_sub_paths(config, &[]) else { return };
    let log = Path::new("/var/log/pods/p").join(&container.log_path);
    assert!(
        log.components().all(|c| !matches!(c, Component::ParentDir))
            && log.starts_with("/var/log/pods/p"),
        "log_path {:?} leaves the log directory",
        container.log_path
    );
    // A Localhost profile is a file on the node the daemon reads: not the fuzzer's to pick.
    if matches!(container.security.seccomp, SeccompProfile::Localhost(_)) {
        container.security.seccomp = SeccompProfile::RuntimeDefault;
    }
    let mounts: Vec<GuestMount> = container
        .mounts
        .iter()
        .enumerate()
        .map(|(n, m)| GuestMount {
            guest_source: PathBuf::from(format!("/run/podvisor/shared/mounts/{n}")),
            container_path: m.container_path.clone(),
            read_only: m.read_only,
            recursive_read_only: m.recursive_read_only,
            propagation: m.propagation,
            from_image: m.image.is_some(),
        })
        .collect();
    let image = ImageDefaults {
        entrypoint: vec!["/bin/sh".into()],
        cmd: Vec::new(),
        env: vec!["PATH=/bin".into()],
        working_dir: String::new(),
        user: String::new(),
        rootfs: PathBuf::from("/nonexistent"),
        stop_signal: Some(container.image.clone()),
    };
    let context = SandboxContext { pid_mode: NamespaceMode::Pod, user_namespace: None };
    if let Ok(json) = spec::build_spec(&container, &image, &context, &mounts) {
        let _ = spec::process_of(&json);
    }
    let _ = parse_signal(&container.image);
}

fn update_container_resources(body: &[u8]) {
    let Ok(req) = cri::UpdateContainerResourcesRequest::decode(body) else { return };
    let Some(linux) = req.linux else { return };
    let _ = spec::resources_json(&translate::resources(linux));
}

/// The seeds of `fuzz/corpus/cri_request`: a request of each kind, as kubelet sends them.
/// `PODVISOR_WRITE_FUZZ_SEEDS=<dir> cargo test -p podvisor --lib cri::fuzzing` rewrites them.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let metadata = Some(cri::PodSandboxMetadata {
        name: "web".into(),
        uid: "6f1c".into(),
        namespace: "default".into(),
        attempt: 0,
    });
    let resources = cri::LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: 50_000,
        cpu_shares: 512,
        memory_limit_in_bytes: 64 << 20,
        ..Default::default()
    };
    let pod = cri::PodSandboxConfig {
        metadata,
        hostname: "web".into(),
        log_directory: "/var/log/pods/default_web_6f1c".into(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.96.0.10".into()],
            searches: vec!["default.svc.cluster.local".into()],
            options: vec!["ndots:5".into()],
        }),
        port_mappings: vec![cri::PortMapping {
            protocol: cri::Protocol::Tcp as i32,
            container_port: 80,
            host_port: 8080,
            host_ip: String::new(),
        }],
        labels: [("app".to_string(), "web".to_string())].into(),
        linux: Some(cri::LinuxPodSandboxConfig {
            cgroup_parent: "/kubepods/pod6f1c".into(),
            sysctls: [("net.ipv4.ip_unprivileged_port_start".to_string(), "0".to_string())].into(),
            resources: Some(resources.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let run =
        cri::RunPodSandboxRequest { config: Some(pod.clone()), runtime_handler: "podvisor".into() };
    let security = cri::LinuxContainerSecurityContext {
        capabilities: Some(cri::Capability {
            add_capabilities: vec!["NET_ADMIN".into()],
            drop_capabilities: vec!["MKNOD".into()],
            add_ambient_capabilities: Vec::new(),
        }),
        run_as_user: Some(cri::Int64Value { value: 1000 }),
        readonly_rootfs: true,
        no_new_privs: true,
        seccomp: Some(cri::SecurityProfile {
            profile_type: cri::security_profile::ProfileType::RuntimeDefault as i32,
            localhost_ref: String::new(),
        }),
        ..Default::default()
    };
    let container = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "nginx".into(), attempt: 0 }),
        image: Some(cri::ImageSpec {
            image: "docker.io/library/nginx:1.27".into(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into()],
        args: vec!["-c".into(), "exec nginx".into()],
        working_dir: "/srv".into(),
        envs: vec![cri::KeyValue { key: "PORT".into(), value: "80".into() }],
        mounts: vec![cri::Mount {
            container_path: "/etc/config".into(),
            host_path: "/var/lib/kubelet/pods/6f1c/volumes/config".into(),
            readonly: true,
            propagation: cri::MountPropagation::PropagationPrivate as i32,
            ..Default::default()
        }],
        log_path: "nginx/0.log".into(),
        linux: Some(cri::LinuxContainerConfig {
            resources: Some(resources.clone()),
            security_context: Some(security),
        }),
        ..Default::default()
    };
    let create = cri::CreateContainerRequest {
        pod_sandbox_id: "0123abcd".into(),
        config: Some(container),
        sandbox_config: Some(pod),
    };
    let update = cri::UpdateContainerResourcesRequest {
        container_id: "4567ef".into(),
        linux: Some(resources),
        ..Default::default()
    };
    let tagged = |kind: u8, body: Vec<u8>| [vec![kind], body].concat();
    vec![
        ("run_pod_sandbox", tagged(0, run.encode_to_vec())),
        ("create_container", tagged(1, create.encode_to_vec())),
        ("update_container_resources", tagged(2, update.encode_to_vec())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each seed is a request the CRI layer accepts, so the fuzzer starts from valid ones.
    #[test]
    fn seeds_are_accepted() {
        for (name, seed) in seeds() {
            request(&seed);
            let body = &seed[1..];
            let accepted = match seed[0] {
                0 => translate::pod_spec(cri::RunPodSandboxRequest::decode(body).unwrap()).is_ok(),
                1 => {
                    let req = cri::CreateContainerRequest::decode(body).unwrap();
                    translate::container_spec(req.config.unwrap()).is_ok()
                }
                _ => cri::UpdateContainerResourcesRequest::decode(body).unwrap().linux.is_some(),
            };
            assert!(accepted, "{name}");
            if let Some(dir) = std::env::var_os("PODVISOR_WRITE_FUZZ_SEEDS") {
                std::fs::write(Path::new(&dir).join(name), &seed).unwrap();
            }
        }
    }
}
