//! Fast tests of the sandbox layer on a fake hypervisor and a fake agent: the lifecycle, the
//! failure paths, recovery across a daemon restart, and concurrent calls, without a VM.
//! (The shares are real bind mounts: the tests run as root, as the daemon does.)

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::agent::fake::{FakeAgent, FakeDialer};
use crate::agent::{OutputKind, StdioMode, GUEST_SHARED_DIR, GUEST_VOLUME_DIR, VOLUME_FS_TAG};
use crate::hypervisor::fake::FakeHypervisor;
use crate::resource::network::NetworkError;
use crate::resource::{PodResources, ShareLayout};

struct FakeImages {
    rootfs: PathBuf,
}

/// A second image ("data"), a sibling of the first: image volumes mount it.
const DATA_IMAGE_ID: &str = "sha256:da7a";

impl ImageResolver for FakeImages {
    fn resolve(&self, image: &str) -> std::result::Result<Option<ResolvedImage>, String> {
        if image == "data" {
            let rootfs = self.rootfs.with_file_name("data-image");
            return Ok(Some(ResolvedImage {
                id: DATA_IMAGE_ID.into(),
                image_ref: format!("data@{DATA_IMAGE_ID}"),
                rootfs: rootfs.clone(),
                defaults: ImageDefaults { rootfs, ..Default::default() },
            }));
        }
        if image != "busybox" {
            return Ok(None);
        }
        Ok(Some(ResolvedImage {
            id: "sha256:feedbeef".into(),
            image_ref: "busybox@sha256:feedbeef".into(),
            rootfs: self.rootfs.clone(),
            defaults: ImageDefaults {
                entrypoint: vec!["sh".into()],
                rootfs: self.rootfs.clone(),
                ..Default::default()
            },
        }))
    }
}

struct Harness {
    dir: tempfile::TempDir,
    config: Arc<Config>,
    hv: Arc<FakeHypervisor>,
    dialer: Arc<FakeDialer>,
    manager: Arc<SandboxManager>,
}

impl Harness {
    fn new() -> Self {
        Self::with_boot_timeout(60)
    }

    fn with_boot_timeout(seconds: u64) -> Self {
        Self::build(seconds, false)
    }

    /// Pods join a CNI network of fake plugins (see [`fake_cni`]).
    fn with_network() -> Self {
        Self::build(60, true)
    }

    /// Pods start from VM templates; the "kernel" and "initramfs" are small files of the test's.
    fn with_templates(network: bool) -> Self {
        Self::with_templates_and_boot_timeout(network, 60)
    }

    fn with_templates_and_boot_timeout(network: bool, seconds: u64) -> Self {
        Self::build_with(seconds, network, use_templates)
    }

    fn build(seconds: u64, network: bool) -> Self {
        Self::build_with(seconds, network, |_, _| {})
    }

    fn build_with(seconds: u64, network: bool, tweak: impl FnOnce(&mut Config, &Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("image");
        std::fs::create_dir_all(rootfs.join("etc")).unwrap();
        std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
        let mut config = Config {
            root: dir.path().join("root"),
            state: dir.path().join("state"),
            ..Config::default()
        };
        config.vm.boot_timeout_seconds = seconds;
        // On by default; only the template tests (`with_templates`) build any.
        config.vm.templates = false;
        config.network.enabled = network;
        if network {
            config.network.cni_conf_dir = dir.path().join("cni-conf");
            config.network.cni_bin_dirs = vec![dir.path().join("cni-bin")];
            fake_cni(dir.path());
        }
        tweak(&mut config, dir.path());
        let config = Arc::new(config);
        let hv = FakeHypervisor::new(&config.state);
        let dialer = Arc::new(FakeDialer::default());
        let manager = Self::manager(&config, &hv, &dialer, &rootfs);
        Self { dir, config, hv, dialer, manager }
    }

    fn manager(
        config: &Arc<Config>,
        hv: &Arc<FakeHypervisor>,
        dialer: &Arc<FakeDialer>,
        rootfs: &Path,
    ) -> Arc<SandboxManager> {
        SandboxManager::new(
            config.clone(),
            Arc::new(Registry::new(hv.clone())),
            dialer.clone(),
            Arc::new(FakeImages { rootfs: rootfs.to_path_buf() }),
        )
    }

    /// A new daemon on the same records, VMs and agents (the old one is dropped).
    async fn restart(&mut self) {
        self.manager =
            Self::manager(&self.config, &self.hv, &self.dialer, &self.dir.path().join("image"));
        self.manager.recover().await.unwrap();
    }

    fn pod(&self, name: &str) -> PodSpec {
        PodSpec {
            metadata: PodMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            },
            log_directory: self.dir.path().join("logs").display().to_string(),
            hostname: name.into(),
            ..Default::default()
        }
    }

    async fn run_pod(&self, name: &str) -> String {
        self.manager.run_sandbox(self.pod(name)).await.unwrap()
    }

    fn agent(&self, sandbox_id: &str) -> FakeAgent {
        self.dialer.of(sandbox_id)
    }

    async fn create(&self, sid: &str, name: &str) -> String {
        self.manager.create_container(sid, container(name)).await.unwrap()
    }

    async fn create_and_start(&self, sid: &str, name: &str) -> String {
        let cid = self.create(sid, name).await;
        self.manager.start_container(&cid).await.unwrap();
        cid
    }

    fn log_of(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join("logs").join(format!("{name}.log")))
            .unwrap_or_default()
    }

    /// Nothing of any pod is left: no VM, no record, no state, no mount.
    fn assert_nothing_left(&self) {
        assert_eq!(self.hv.running(), 0, "VMs left");
        let entries = |dir: PathBuf| -> Vec<PathBuf> {
            std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect()
        };
        assert!(entries(self.config.root.join("sandboxes")).is_empty(), "records left");
        assert!(entries(self.config.state.join("sandboxes")).is_empty(), "state left");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let ours = self.dir.path().display().to_string();
        assert!(!mounts.contains(&ours), "mounts left under {ours}");
    }
}

impl Drop for Harness {
    /// A failed test must not leave its bind mounts behind.
    fn drop(&mut self) {
        for entry in
            std::fs::read_dir(self.config.state.join("sandboxes")).into_iter().flatten().flatten()
        {
            let _ = PodResources::new(&entry.path(), ShareLayout::Split).destroy();
        }
    }
}

fn container(name: &str) -> ContainerSpec {
    ContainerSpec {
        name: name.into(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "1000".into()],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// Polls `f` until it holds (5 s at most).
async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Skips (with a line on stderr) where the shares' bind mounts cannot be made.
macro_rules! needs_root {
    () => {
        if !is_root() {
            eprintln!("skipped: the sandbox shares need root for bind mounts");
            return;
        }
    };
}

/// A CNI network whose one plugin logs its calls to `cni.log` and, at ADD, makes `eth0` a
/// veth end in the pod's namespace and answers 10.9.0.7/24; it fails pods named `bad`.
fn fake_cni(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let (conf, bin) = (dir.join("cni-conf"), dir.join("cni-bin"));
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(
        conf.join("10-fake.conflist"),
        r#"{"cniVersion":"1.0.0","name":"fake","plugins":[{"type":"fake"}]}"#,
    )
    .unwrap();
    let log = dir.join("cni.log");
    let script = format!(
        r#"#!/bin/sh
cat > /dev/null
echo "$CNI_COMMAND $CNI_CONTAINERID" >> {log}
[ "$CNI_COMMAND" = ADD ] || exit 0
case "$CNI_ARGS" in *K8S_POD_NAME=bad*) echo '{{"code":7,"msg":"no addresses left"}}'; exit 1;; esac
nsenter --net="$CNI_NETNS" ip link add eth0 type veth peer name peer0 || exit 1
nsenter --net="$CNI_NETNS" ip link set eth0 up || exit 1
echo '{{"cniVersion":"1.0.0","interfaces":[{{"name":"eth0","sandbox":"'"$CNI_NETNS"'"}}],"ips":[{{"interface":0,"address":"10.9.0.7/24","gateway":"10.9.0.1"}}],"routes":[{{"dst":"0.0.0.0/0"}}]}}'
"#,
        log = log.display()
    );
    let plugin = bin.join("fake");
    std::fs::write(&plugin, script).unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn cni_calls(h: &Harness) -> String {
    std::fs::read_to_string(h.dir.path().join("cni.log")).unwrap_or_default()
}

// VM templates.

/// Templates on, with a "kernel" and "initramfs" of small files of the test's.
fn use_templates(config: &mut Config, dir: &Path) {
    config.vm.templates = true;
    config.vm.kernel = dir.join("vmlinux");
    config.vm.initrd = dir.join("initramfs.cpio");
    std::fs::write(&config.vm.kernel, "kernel v1").unwrap();
    std::fs::write(&config.vm.initrd, "initramfs v1").unwrap();
}

impl Harness {
    /// Waits until no template build runs; returns the templates' states.
    async fn templates_settled(&self) -> Vec<templates::TemplateStatus> {
        let manager = self.manager.clone();
        eventually("the template builds", move || {
            manager.template_status().iter().all(|t| t.state != "building")
        })
        .await;
        self.manager.template_status()
    }

    /// The template VMs started so far (their ids start with `t`, pods' are hex).
    fn template_boots(&self) -> usize {
        self.hv.behave().specs.iter().filter(|s| s.sandbox_id.starts_with('t')).count()
    }

    fn start_of(&self, sid: &str) -> StartRecord {
        self.manager.sandbox(sid).unwrap().start.expect("the start is recorded")
    }
}

/// The first pod cold-boots while its template is built in the background; the next ones
/// start from it, each re-identified with entropy of its own; removing a pod leaves the
/// template intact.
#[tokio::test]
async fn the_first_pod_cold_boots_and_builds_the_template_the_next_restore() {
    needs_root!();
    let h = Harness::with_templates(false);
    let first = h.run_pod("first").await;
    let start = h.start_of(&first);
    assert_eq!(start.path, "cold");
    assert!(start.reason.contains("no template") && start.reason.contains("building"), "{start:?}");
    let settled = h.templates_settled().await;
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert_eq!(settled[0].state, "ready", "{settled:?}");
    let (pauses, snapshots) = {
        let b = h.hv.behave();
        (b.pauses, b.snapshots)
    };
    assert_eq!((pauses, snapshots), (1, 1));
    assert_eq!(h.hv.running(), 1, "the template VM is stopped once snapshotted");

    let (a, b) = (h.run_pod("a").await, h.run_pod("b").await);
    for sid in [&a, &b] {
        let start = h.start_of(sid);
        assert_eq!(
            (start.path.as_str(), start.template.as_str()),
            ("template", settled[0].key.as_str())
        );
    }
    let restores = h.hv.behave().restores.clone();
    assert_eq!(restores.len(), 2);
    let template_dir = h.config.state.join("templates").join(&settled[0].key);
    assert_eq!(restores[0], template_dir.join("snapshot"));
    let (sa, sb) = (h.agent(&a).sandbox().unwrap(), h.agent(&b).sandbox().unwrap());
    assert_eq!(sa.entropy.len(), 64);
    assert_ne!(sa.entropy, sb.entropy, "two pods of one template got the same seed");
    assert_ne!(sa.entropy, h.agent(&first).sandbox().unwrap().entropy);
    assert_eq!((sa.hostname.as_str(), sb.hostname.as_str()), ("a", "b"));
    assert!(sa.mac_changes.is_empty(), "no network, no MAC to change");
    assert_eq!(h.template_boots(), 1);

    for sid in [&first, &a, &b] {
        h.manager.remove_sandbox(sid).await.unwrap();
    }
    h.assert_nothing_left();
    assert!(template_dir.join("template.json").exists(), "removing pods took the template");
    assert_eq!(h.templates_settled().await[0].state, "ready");
}

/// A restored pod's network device still has the template's MAC: CreateSandbox changes it to
/// the pod's before SetupNetwork looks devices up by MAC.
#[tokio::test]
async fn a_restored_pod_gets_its_own_mac_before_its_network() {
    needs_root!();
    let h = Harness::with_templates(true);
    h.run_pod("first").await;
    let settled = h.templates_settled().await;
    assert_eq!(settled[0].state, "ready", "{settled:?}");
    let template_spec =
        h.hv.behave().specs.iter().find(|s| s.sandbox_id.starts_with('t')).cloned().unwrap();
    assert_eq!(template_spec.net_devices.len(), 1, "the template has the pod's device list");
    assert!(template_spec.net_devices[0].tap_fd.is_none());
    let pod_tags = |spec: &crate::hypervisor::VmSpec| -> Vec<String> {
        spec.shared_dirs.iter().map(|d| d.tag.clone()).collect()
    };
    assert_eq!(pod_tags(&template_spec), pod_tags(&h.hv.behave().specs[0]), "same shares");
    assert!(template_spec
        .shared_dirs
        .iter()
        .all(|d| !d.host_path.starts_with(h.config.state.join("sandboxes"))));
    let sid = h.run_pod("web").await;
    assert_eq!(h.start_of(&sid).path, "template");
    let agent = h.agent(&sid);
    let setup = agent.sandbox().unwrap();
    let template_mac = template_spec.net_devices[0].mac.clone();
    assert_eq!(setup.mac_changes, vec![(template_mac.clone(), setup_mac(&agent))]);
    assert_ne!(template_mac, setup_mac(&agent), "the pod kept the template's MAC");
    let calls = agent.calls();
    let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
    assert!(at("CreateSandbox") < at("SetupNetwork"));
}

/// The MAC SetupNetwork names: the pod's own.
fn setup_mac(agent: &FakeAgent) -> String {
    agent.network().expect("SetupNetwork was sent").interfaces[0].mac.clone()
}

/// A changed initramfs is a new key: the next pod cold-boots, the template is rebuilt, and the
/// old one (same handler and shape) is removed.
#[tokio::test]
async fn a_changed_initramfs_rebuilds_the_template_and_drops_the_old_one() {
    needs_root!();
    let h = Harness::with_templates(false);
    h.run_pod("first").await;
    let old = h.templates_settled().await[0].key.clone();
    std::fs::write(&h.config.vm.initrd, "initramfs v2, longer").unwrap();
    let sid = h.run_pod("after-change").await;
    let start = h.start_of(&sid);
    assert_eq!(start.path, "cold");
    assert!(start.reason.contains("no template"), "{start:?}");
    let settled = h.templates_settled().await;
    assert_eq!(settled.len(), 1, "the old template was not swept: {settled:?}");
    assert_ne!(settled[0].key, old);
    assert_eq!(h.template_boots(), 2);
    assert_eq!(h.start_of(&h.run_pod("next").await).path, "template");
}

/// A template whose state file changed, or whose memory file lost its size, is not used: the
/// pod cold-boots with the reason, and the template is rebuilt.
#[tokio::test]
async fn a_corrupt_template_falls_back_to_cold_boot_and_is_rebuilt() {
    needs_root!();
    let h = Harness::with_templates(false);
    h.run_pod("first").await;
    let key = h.templates_settled().await[0].key.clone();
    let snapshot = h.config.state.join("templates").join(&key).join("snapshot");
    std::fs::write(snapshot.join("vm.state"), "PVSNAPST flipped bits").unwrap();
    let sid = h.run_pod("after-corruption").await;
    let start = h.start_of(&sid);
    assert_eq!(start.path, "cold");
    assert!(start.reason.contains(&key) && start.reason.contains("corrupt"), "{start:?}");
    assert!(start.reason.contains("vm.state"), "{start:?}");
    assert_eq!(h.templates_settled().await[0].state, "ready");
    assert_eq!(h.template_boots(), 2);

    std::fs::File::options()
        .write(true)
        .open(snapshot.join("memory.bin"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let start = h.start_of(&h.run_pod("truncated").await);
    assert!(start.reason.contains("memory.bin"), "{start:?}");
    h.templates_settled().await;
    assert_eq!(h.start_of(&h.run_pod("rebuilt").await).path, "template");
}

/// A restored VM that exits while its agent is awaited ends the wait at once: the pod
/// cold-boots without waiting out the restored agent's 30 s.
#[tokio::test]
async fn a_restored_vm_that_exits_falls_back_at_once() {
    needs_root!();
    let h = Harness::with_templates(false);
    h.run_pod("first").await;
    h.templates_settled().await;
    let agent = h.dialer.next_agent();
    agent.hang_next("Ping");
    let started = std::time::Instant::now();
    let running = tokio::spawn({
        let (manager, pod) = (h.manager.clone(), h.pod("dies"));
        async move { manager.run_sandbox(pod).await }
    });
    eventually("the restored agent is called", move || agent.calls().iter().any(|c| c == "Ping"))
        .await;
    let restored = h.manager.list_sandboxes().into_iter().find(|s| s.metadata.name == "dies");
    h.hv.kill(restored.and_then(|s| s.vm).as_ref().unwrap());
    let sid = running.await.unwrap().unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    let start = h.start_of(&sid);
    assert_eq!(start.path, "cold", "{start:?}");
    assert!(start.reason.contains("the restored VM exited"), "{start:?}");
}

/// A pod whose guest does not boot builds no template (it would not boot either); the next
/// pod of the key that boots does.
#[tokio::test]
async fn a_pod_that_fails_to_boot_builds_no_template() {
    needs_root!();
    let h = Harness::with_templates(false);
    h.hv.behave().die_while_booting = true;
    h.manager.run_sandbox(h.pod("doomed")).await.unwrap_err();
    // A build would have started once the failed pod gave its boot slot back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(h.templates_settled().await.is_empty());
    assert_eq!(h.template_boots(), 0);
    h.assert_nothing_left();
    let start = h.start_of(&h.run_pod("boots").await);
    assert!(start.reason.contains("no template"), "the key was given back: {start:?}");
    assert_eq!(h.templates_settled().await[0].state, "ready");
    assert_eq!(h.template_boots(), 1);
}

/// Pods started together build their template once.
#[tokio::test]
async fn concurrent_pods_build_their_template_once() {
    needs_root!();
    let h = Harness::with_templates(false);
    h.hv.behave().ready_delay = Duration::from_millis(100);
    let pods = (0..4).map(|n| h.manager.run_sandbox(h.pod(&format!("p{n}"))));
    for result in futures::future::join_all(pods).await {
        result.unwrap();
    }
    h.templates_settled().await;
    assert_eq!(h.template_boots(), 1);
    assert_eq!(h.hv.behave().snapshots, 1);
}

/// Where a template cannot be used the pod cold-boots and the record says why: templates off,
/// a backend or VM that cannot snapshot (no build then), a restore that fails (the template
/// is rebuilt).
#[tokio::test]
async fn pods_cold_boot_where_no_template_can_be_used() {
    needs_root!();
    let off = Harness::new();
    let start = off.start_of(&off.run_pod("off").await);
    assert!(start.path == "cold" && start.reason.contains("templates are off"), "{start:?}");
    assert_eq!(off.template_boots(), 0);

    let capped = Harness::build_with(60, false, |config, dir| {
        use_templates(config, dir);
        config.vm.max_templates = 0;
    });
    let start = capped.start_of(&capped.run_pod("capped").await);
    assert!(start.reason.contains("max_templates = 0"), "{start:?}");
    assert_eq!(capped.template_boots(), 0);

    let h = Harness::with_templates(false);
    h.hv.behave().template_refusal = Some("the fake cannot snapshot this VM".into());
    let start = h.start_of(&h.run_pod("refused").await);
    assert_eq!(start.reason, "the fake cannot snapshot this VM");
    assert!(h.templates_settled().await.is_empty());
    assert_eq!(h.template_boots(), 0);

    h.hv.behave().template_refusal = None;
    h.run_pod("builds").await;
    let key = h.templates_settled().await[0].key.clone();
    h.hv.behave().fail_restore = true;
    let start = h.start_of(&h.run_pod("restore-fails").await);
    assert_eq!(start.path, "cold");
    assert!(start.reason.contains(&format!("restoring template {key} failed")), "{start:?}");
    assert_eq!(h.templates_settled().await[0].state, "ready", "rebuilt");
    assert_eq!(h.template_boots(), 2);
    assert_eq!(h.start_of(&h.run_pod("again").await).path, "template");
}

/// A restored guest whose agent never answers: after a bounded wait of its own the restored
/// VM is stopped and cleaned up, the template discarded, and the pod cold-boots in a fresh VM
/// and runs, its record (verbose PodSandboxStatus' `startReason`) saying why; the template is
/// rebuilt and later pods restore again.
#[tokio::test]
async fn a_restored_agent_that_never_answers_falls_back_to_a_cold_boot() {
    needs_root!();
    // The restored agent's wait is min(boot timeout, 30 s): 2 s here.
    let h = Harness::with_templates_and_boot_timeout(false, 2);
    use crate::hypervisor::Hypervisor as _;
    h.run_pod("first").await;
    let key = h.templates_settled().await[0].key.clone();
    h.dialer.next_agent().hang_next("Ping");
    let stops = h.hv.behave().stops;
    let started = std::time::Instant::now();
    let sid = tokio::time::timeout(Duration::from_secs(20), h.manager.run_sandbox(h.pod("silent")))
        .await
        .expect("RunPodSandbox waited on a restored agent that never answers")
        .expect("the pod cold-booted instead");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    assert_eq!(h.hv.behave().restores.len(), 1, "it was restored first");
    let rec = h.manager.sandbox(&sid).unwrap();
    assert_eq!(rec.state, SandboxState::Ready);
    let start = rec.start.clone().unwrap();
    assert_eq!(start.path, "cold", "{start:?}");
    assert!(start.reason.contains(&key) && start.reason.contains("did not answer"), "{start:?}");
    assert!(start.template.is_empty(), "{start:?}");
    assert!(h.hv.is_running(rec.vm.as_ref().unwrap()), "the record holds the cold VM");
    assert!(h.agent(&sid).sandbox().is_some_and(|s| s.mac_changes.is_empty()));

    let settled = h.templates_settled().await;
    assert_eq!(settled.len(), 1, "{settled:?}");
    assert_eq!(settled[0].state, "ready", "rebuilt: {settled:?}");
    assert_eq!(h.template_boots(), 2);
    assert_eq!(h.hv.behave().stops, stops + 2, "the restored VM and the rebuild's VM stopped");
    assert_eq!(h.hv.running(), 2, "the first pod's VM and the cold-booted one");
    assert_eq!(h.start_of(&h.run_pod("after").await).path, "template");
    for sid in h.manager.list_sandboxes().into_iter().map(|s| s.id) {
        h.manager.remove_sandbox(&sid).await.unwrap();
    }
    h.assert_nothing_left();
    let run_dirs = std::fs::read_dir(h.config.state.join("vms")).unwrap().count();
    assert_eq!(run_dirs, 0, "a VM run directory was left");
}

// Pods.

#[tokio::test]
async fn a_networked_pod_gets_its_cni_interface_and_stop_runs_del() {
    needs_root!();
    let h = Harness::with_network();
    assert_eq!(h.manager.network_ready(), Ok(()));
    let sid = h.run_pod("web").await;
    let rec = h.manager.sandbox(&sid).unwrap();
    let network = rec.network.clone().expect("the record keeps the attachment");
    assert_eq!(network.pod_ips(), vec!["10.9.0.7".parse::<std::net::IpAddr>().unwrap()]);
    assert!(crate::resource::network::netns::is_pinned(&network.netns));
    let spec = h.hv.behave().specs[0].clone();
    let device = &spec.net_devices[0];
    assert!(device.tap_fd.is_some(), "the VMM is handed an open tap");
    let setup = h.agent(&sid).network().expect("SetupNetwork was sent");
    assert_eq!(setup.interfaces[0].mac, device.mac, "the guest takes the CNI interface's MAC");
    assert_eq!(setup.interfaces[0].name, "eth0");
    assert_eq!(setup.interfaces[0].addresses, vec!["10.9.0.7/24".parse().unwrap()]);
    assert_eq!(setup.routes[0].gateway, Some("10.9.0.1".parse().unwrap()));
    assert_eq!(setup.hosts, vec![("10.9.0.7".parse().unwrap(), vec!["web".to_string()])]);
    let calls = h.agent(&sid).calls();
    let at = |c: &str| calls.iter().position(|x| x == c).unwrap();
    assert!(at("CreateSandbox") < at("SetupNetwork"));

    h.manager.stop_sandbox(&sid).await.unwrap();
    assert_eq!(cni_calls(&h), format!("ADD {sid}\nDEL {sid}\n"));
    assert!(!network.netns.exists(), "the namespace outlived StopPodSandbox");
    assert!(h.manager.sandbox(&sid).unwrap().network.is_none());
    h.manager.stop_sandbox(&sid).await.unwrap();
    h.manager.remove_sandbox(&sid).await.unwrap();
    assert_eq!(cni_calls(&h).lines().count(), 2, "DEL ran again for a detached pod");
}

#[tokio::test]
async fn a_pod_resize_within_its_vm_is_accepted_and_one_beyond_refused() {
    needs_root!();
    let h = Harness::new();
    let mut pod = h.pod("p");
    pod.demand = PodDemand { cpu_millis: 1500, memory_bytes: 192 << 20 };
    let sid = h.manager.run_sandbox(pod).await.unwrap();
    let size = h.manager.sandbox(&sid).unwrap().vm_size.unwrap();
    assert_eq!((size.vcpus, size.memory_mib), (2, 256));
    let smaller = PodDemand { cpu_millis: 1000, memory_bytes: 128 << 20 };
    h.manager.update_pod_resources(&sid, smaller).await.unwrap();
    let bigger = PodDemand { cpu_millis: 1000, memory_bytes: 512 << 20 };
    let err = h.manager.update_pod_resources(&sid, bigger).await.unwrap_err();
    assert!(matches!(err, SandboxError::PodOutgrowsVm { vm_mib: 256, .. }), "{err}");
    let err = h.manager.update_pod_resources("nope", smaller).await.unwrap_err();
    assert!(matches!(err, SandboxError::SandboxNotFound(_)), "{err}");
}

#[tokio::test]
async fn a_failed_add_is_deleted_and_leaves_no_namespace() {
    needs_root!();
    let h = Harness::with_network();
    let err = h.manager.run_sandbox(h.pod("bad")).await.unwrap_err();
    assert!(err.to_string().contains("no addresses left"), "{err}");
    let calls = cni_calls(&h);
    assert!(calls.starts_with("ADD ") && calls.contains("\nDEL "), "{calls}");
    assert!(h.manager.list_sandboxes().is_empty());
    assert_eq!(h.hv.behave().starts, 0, "a VM was started without a network");
    let netns_dir = h.config.netns_dir();
    let left: Vec<_> = std::fs::read_dir(&netns_dir).into_iter().flatten().flatten().collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[tokio::test]
async fn without_a_cni_configuration_pods_are_refused_and_status_says_why() {
    needs_root!();
    let h = Harness::with_network();
    std::fs::remove_file(h.dir.path().join("cni-conf/10-fake.conflist")).unwrap();
    let why = h.manager.network_ready().unwrap_err();
    assert!(why.contains("no CNI network configuration"), "{why}");
    let err = h.manager.run_sandbox(h.pod("p")).await.unwrap_err();
    assert!(matches!(err, SandboxError::Network(NetworkError::NotReady(_))), "{err}");
    assert!(h.manager.list_sandboxes().is_empty());
}

#[tokio::test]
async fn a_pod_boots_with_an_image_share_and_a_volume_share() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("web").await;
    let rec = h.manager.sandbox(&sid).unwrap();
    assert_eq!(rec.state, SandboxState::Ready);
    assert_eq!(rec.share_layout, ShareLayout::Split);
    let spec = h.hv.behave().specs[0].clone();
    assert_eq!(spec.shared_dirs.len(), 2);
    assert!(spec.shared_dirs[0].read_only && !spec.shared_dirs[1].read_only);
    let setup = h.agent(&sid).sandbox().unwrap();
    assert_eq!(setup.hostname, "web");
    assert!(setup.pod_pid_namespace, "POD is the default PID mode");
    assert!(setup
        .shares
        .iter()
        .any(|s| s.tag == VOLUME_FS_TAG && s.guest_path == GUEST_VOLUME_DIR));
    assert!(setup.host_time_unix_nanos > 0);
}

#[tokio::test]
async fn records_are_written_in_the_current_schema() {
    needs_root!();
    let h = Harness::new();
    let mut pod = h.pod("p");
    pod.namespaces.pid = NamespaceMode::Container;
    let sid = h.manager.run_sandbox(pod).await.unwrap();
    let text =
        std::fs::read_to_string(h.config.root.join("sandboxes").join(&sid).join("sandbox.json"))
            .unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(value["schema_version"], 1);
    assert_eq!(value["namespaces"]["pid"], "Container");
    assert!(value.get("pid_mode").is_none(), "no CRI integers in records: {text}");
    assert!(!h.agent(&sid).sandbox().unwrap().pod_pid_namespace);
}

#[tokio::test]
async fn a_duplicate_pod_is_refused_and_another_attempt_is_not() {
    needs_root!();
    let h = Harness::new();
    h.run_pod("p").await;
    let err = h.manager.run_sandbox(h.pod("p")).await.unwrap_err();
    assert!(matches!(err, SandboxError::SandboxExists { .. }), "{err}");
    let mut next = h.pod("p");
    next.metadata.attempt = 1;
    h.manager.run_sandbox(next).await.unwrap();
}

#[tokio::test]
async fn a_failed_vm_start_leaves_nothing_and_frees_the_name() {
    needs_root!();
    let h = Harness::new();
    h.hv.behave().fail_start = true;
    let err = h.manager.run_sandbox(h.pod("p")).await.unwrap_err();
    assert!(matches!(err, SandboxError::Hypervisor(_)), "{err}");
    assert!(h.manager.list_sandboxes().is_empty());
    h.assert_nothing_left();
    assert!(!h.config.state.join("vms").read_dir().unwrap().any(|_| true), "run dir left");
    h.run_pod("p").await;
}

#[tokio::test]
async fn a_guest_that_never_boots_times_out_and_is_stopped() {
    needs_root!();
    let h = Harness::with_boot_timeout(1);
    h.hv.behave().never_ready = true;
    let err = h.manager.run_sandbox(h.pod("p")).await.unwrap_err();
    assert!(matches!(err, SandboxError::Boot { .. }), "{err}");
    assert!(err.to_string().contains("did not announce itself"), "{err}");
    h.assert_nothing_left();
}

#[tokio::test]
async fn a_guest_that_dies_while_booting_is_reported_with_its_console() {
    needs_root!();
    let h = Harness::new();
    h.hv.behave().die_while_booting = true;
    let err = h.manager.run_sandbox(h.pod("p")).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("VM exited") && text.contains("guest console ends with"), "{text}");
    assert_eq!(crate::cri::code(&err), tonic::Code::Unavailable);
    h.assert_nothing_left();
}

#[tokio::test]
async fn an_agent_failing_create_sandbox_stops_the_vm() {
    needs_root!();
    let h = Harness::new();
    h.dialer.next_agent().fail_next("CreateSandbox");
    let err = h.manager.run_sandbox(h.pod("p")).await.unwrap_err();
    assert!(matches!(err, SandboxError::Agent(_)), "{err}");
    h.assert_nothing_left();
}

#[tokio::test]
async fn stopping_a_pod_stops_its_containers_and_vm_and_is_idempotent() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    h.manager.stop_sandbox(&sid).await.unwrap();
    let c = h.manager.container(&cid).unwrap();
    assert_eq!(c.state, ContainerState::Exited);
    assert_eq!(h.manager.sandbox(&sid).unwrap().state, SandboxState::NotReady);
    assert!(h.manager.sandbox(&sid).unwrap().vm.is_none());
    assert_eq!(h.hv.running(), 0);
    assert!(h.agent(&sid).calls().contains(&"Shutdown".to_string()));
    h.manager.stop_sandbox(&sid).await.unwrap();
    h.manager.stop_sandbox("no-such-pod").await.unwrap();
}

#[tokio::test]
async fn a_failed_hypervisor_stop_keeps_the_vm_recorded_for_a_retry() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    h.hv.behave().failing_stops = 1;
    assert!(h.manager.stop_sandbox(&sid).await.is_err());
    assert!(h.manager.sandbox(&sid).unwrap().vm.is_some(), "the running VM must stay known");
    assert_eq!(h.hv.running(), 1);
    h.manager.remove_sandbox(&sid).await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn removing_a_pod_removes_every_trace_and_is_idempotent() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    h.create_and_start(&sid, "c").await;
    h.manager.remove_sandbox(&sid).await.unwrap();
    assert!(h.manager.list_containers().is_empty());
    h.assert_nothing_left();
    h.manager.remove_sandbox(&sid).await.unwrap();
}

#[tokio::test]
async fn a_vm_that_dies_marks_its_pod_not_ready_and_containers_exited() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let vm = h.manager.sandbox(&sid).unwrap().vm.unwrap();
    h.hv.kill(&vm);
    let m = h.manager.clone();
    eventually("the pod to be not ready", || {
        m.sandbox(&sid).unwrap().state == SandboxState::NotReady
    })
    .await;
    let c = h.manager.container(&cid).unwrap();
    assert_eq!(
        (c.state, c.reason.as_str(), c.exit_code),
        (ContainerState::Exited, "VMExited", 255)
    );
    h.manager.remove_sandbox(&sid).await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn running_vms_counts_live_vmms_by_backend() {
    needs_root!();
    let h = Harness::new();
    let fake = |n: u64| vec![("fake".to_string(), n)];
    assert_eq!(h.manager.running_vms(), fake(0), "the default backend is always listed");
    let a = h.run_pod("a").await;
    let b = h.run_pod("b").await;
    assert_eq!(h.manager.running_vms(), fake(2));
    // A VMM that died is not running, whatever its record says until the watcher sees it.
    h.hv.kill(&h.manager.sandbox(&b).unwrap().vm.unwrap());
    assert_eq!(h.manager.running_vms(), fake(1));
    h.manager.remove_sandbox(&a).await.unwrap();
    h.manager.remove_sandbox(&b).await.unwrap();
    assert_eq!(h.manager.running_vms(), fake(0));
}

#[tokio::test]
async fn pod_and_container_starts_are_timed_by_phase() {
    needs_root!();
    // The daemon-wide metrics: other tests record into them too, so only growth is checked.
    let count = |phase: &str| {
        let text = crate::metrics::global().render().unwrap();
        let series = format!(r#"podvisor_pod_start_duration_seconds_count{{phase="{phase}"}}"#);
        text.lines()
            .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let phases =
        ["network", "vm_start", "agent_ready", "sandbox_setup", "pod_ready", "container_running"];
    let before: Vec<f64> = phases.iter().map(|p| count(p)).collect();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    h.create_and_start(&sid, "c").await;
    for (phase, before) in phases.iter().zip(before) {
        assert!(count(phase) >= before + 1.0, "{phase} was not timed");
    }
    h.manager.remove_sandbox(&sid).await.unwrap();
}

// Containers.

#[tokio::test]
async fn a_container_is_created_from_its_image_and_spec() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let mut spec = container("c");
    spec.stdin = true;
    spec.tty = true;
    let cid = h.manager.create_container(&sid, spec).await.unwrap();
    let sent = h.agent(&sid).container(&cid).unwrap();
    assert_eq!(sent.lower_dirs, vec!["images/feedbeef"]);
    assert_eq!(sent.stdio, StdioMode { stdin: true, stdin_once: false, tty: true });
    assert!(sent.join_pod_pid_namespace);
    let oci: serde_json::Value = serde_json::from_slice(&sent.oci_spec_json).unwrap();
    assert_eq!(oci["process"]["args"], serde_json::json!(["sleep", "1000"]));
    let rec = h.manager.container(&cid).unwrap();
    assert_eq!((rec.state, rec.image_id.as_str()), (ContainerState::Created, "sha256:feedbeef"));
    assert!(h.manager.container_using_image("sha256:feedbeef").is_some());
}

/// The identity reaches the record (ContainerStatus reports it), privileged reaches the agent
/// (it adds the VM's devices), and a missing Localhost profile fails before the agent is asked.
#[tokio::test]
async fn the_security_context_reaches_the_agent_and_the_record() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let mut spec = container("c");
    spec.security = SecurityContext {
        run_as_user: Some(1000),
        run_as_group: Some(3000),
        supplemental_groups: vec![4000],
        privileged: true,
        not_applicable: vec!["apparmor".into()],
        ..Default::default()
    };
    let cid = h.manager.create_container(&sid, spec).await.unwrap();
    assert!(h.agent(&sid).container(&cid).unwrap().privileged);
    let rec = h.manager.container(&cid).unwrap();
    assert_eq!(
        rec.process_identity(),
        Some(spec::Identity { uid: 1000, gid: 3000, additional_gids: vec![3000, 4000] })
    );
    assert_eq!(rec.not_applicable, vec!["apparmor"]);

    let mut missing = container("d");
    missing.security.seccomp = SeccompProfile::Localhost(h.dir.path().join("missing.json"));
    let err = h.manager.create_container(&sid, missing).await.unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::Spec(spec::SpecError::Seccomp(seccomp::SeccompError::Open { .. }))
        ),
        "{err}"
    );
    assert_eq!(h.manager.containers_of(&sid).len(), 1);
}

#[tokio::test]
async fn containers_are_refused_for_unknown_images_duplicates_and_stopped_pods() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let mut unknown = container("x");
    unknown.image = "nginx".into();
    let err = h.manager.create_container(&sid, unknown).await.unwrap_err();
    assert!(matches!(err, SandboxError::ImageNotFound(_)), "{err}");
    h.create(&sid, "c").await;
    let err = h.manager.create_container(&sid, container("c")).await.unwrap_err();
    assert!(matches!(err, SandboxError::ContainerExists { .. }), "{err}");
    let err = h.manager.create_container("nope", container("d")).await.unwrap_err();
    assert!(matches!(err, SandboxError::SandboxNotFound(_)), "{err}");
    h.manager.stop_sandbox(&sid).await.unwrap();
    let err = h.manager.create_container(&sid, container("d")).await.unwrap_err();
    assert!(matches!(err, SandboxError::SandboxNotReady(_)), "{err}");
}

#[tokio::test]
async fn volumes_are_bound_writable_into_the_volume_share_and_released_with_the_container() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let volume = h.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let mut spec = container("c");
    spec.mounts = vec![
        VolumeMount {
            container_path: "/data".into(),
            host_path: volume.display().to_string(),
            read_only: false,
            ..Default::default()
        },
        VolumeMount {
            container_path: "/ro".into(),
            host_path: volume.display().to_string(),
            read_only: true,
            ..Default::default()
        },
    ];
    let cid = h.manager.create_container(&sid, spec).await.unwrap();
    let sent = h.agent(&sid).container(&cid).unwrap();
    let oci: serde_json::Value = serde_json::from_slice(&sent.oci_spec_json).unwrap();
    let mounts = oci["mounts"].as_array().unwrap();
    let data = mounts.iter().find(|m| m["destination"] == "/data").unwrap();
    assert_eq!(data["source"], format!("{GUEST_VOLUME_DIR}/{cid}/0"));
    // The guest writes through the share and the host sees it; the read-only one refuses.
    let served = h.config.state.join("sandboxes").join(&sid).join("volumes/shared").join(&cid);
    std::fs::write(served.join("0/from-guest"), b"hi").unwrap();
    assert_eq!(std::fs::read(volume.join("from-guest")).unwrap(), b"hi");
    assert!(std::fs::write(served.join("1/nope"), b"x").is_err());
    h.manager.remove_container(&cid).await.unwrap();
    assert!(!served.exists());
    assert_eq!(std::fs::read(volume.join("from-guest")).unwrap(), b"hi");
}

#[tokio::test]
async fn an_agent_failing_create_container_leaves_no_record_or_volume() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let volume = h.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let mut spec = container("c");
    spec.mounts = vec![VolumeMount {
        container_path: "/v".into(),
        host_path: volume.display().to_string(),
        read_only: false,
        ..Default::default()
    }];
    h.agent(&sid).fail_next("CreateContainer");
    let err = h.manager.create_container(&sid, spec.clone()).await.unwrap_err();
    assert!(matches!(err, SandboxError::Agent(_)), "{err}");
    assert!(h.manager.list_containers().is_empty());
    let volumes = h.config.state.join("sandboxes").join(&sid).join("volumes/mounts");
    assert_eq!(std::fs::read_dir(&volumes).unwrap().count(), 0, "volume binds left");
    h.manager.create_container(&sid, spec).await.unwrap();
}

#[tokio::test]
async fn a_missing_mount_source_is_refused() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let mut spec = container("c");
    spec.mounts = vec![VolumeMount {
        container_path: "/v".into(),
        host_path: "/no/such/dir".into(),
        read_only: true,
        ..Default::default()
    }];
    let err = h.manager.create_container(&sid, spec).await.unwrap_err();
    assert!(matches!(err, SandboxError::MountSourceMissing(_)), "{err}");
    assert_eq!(crate::cri::code(&err), tonic::Code::InvalidArgument);
}

fn image_volume(container_path: &str, image: &str, sub_path: &str) -> VolumeMount {
    VolumeMount {
        container_path: container_path.into(),
        read_only: true,
        image: Some(ImageVolume { image: image.into(), sub_path: sub_path.into() }),
        ..Default::default()
    }
}

/// An image volume is the image's tree from the image share, read-only, nosuid and nodev; it
/// holds its image against RemoveImage until the container is removed.
#[tokio::test]
async fn image_volumes_mount_the_image_tree_and_hold_the_image() {
    needs_root!();
    let h = Harness::new();
    let data = h.dir.path().join("data-image");
    std::fs::create_dir_all(data.join("etc/ssl")).unwrap();
    std::fs::write(data.join("etc/ssl/cert"), "c").unwrap();
    std::os::unix::fs::symlink("etc", data.join("link")).unwrap();
    let sid = h.run_pod("p").await;
    let mut spec = container("c");
    spec.mounts = vec![image_volume("/img", "data", ""), image_volume("/ssl", "data", "link/ssl")];
    let cid = h.manager.create_container(&sid, spec).await.unwrap();
    let sent = h.agent(&sid).container(&cid).unwrap();
    let oci: serde_json::Value = serde_json::from_slice(&sent.oci_spec_json).unwrap();
    let mounts = oci["mounts"].as_array().unwrap();
    let img = mounts.iter().find(|m| m["destination"] == "/img").unwrap();
    assert_eq!(img["source"], format!("{GUEST_SHARED_DIR}/images/da7a"));
    let options: Vec<&str> =
        img["options"].as_array().unwrap().iter().filter_map(|o| o.as_str()).collect();
    for want in ["ro", "nosuid", "nodev"] {
        assert!(options.contains(&want), "{want} missing: {options:?}");
    }
    // The symlink is resolved on the host: the guest binds the real directory.
    let ssl = mounts.iter().find(|m| m["destination"] == "/ssl").unwrap();
    assert_eq!(ssl["source"], format!("{GUEST_SHARED_DIR}/images/da7a/etc/ssl"));
    let served = h.config.state.join("sandboxes").join(&sid).join("share/mounts/images/da7a");
    assert_eq!(std::fs::read_to_string(served.join("etc/ssl/cert")).unwrap(), "c");
    assert!(h.manager.begin_image_removal(DATA_IMAGE_ID).is_err(), "the volume's image is held");
    let status = h.manager.container(&cid).unwrap();
    assert_eq!(status.mounts[0].image, "data");
    h.manager.remove_container(&cid).await.unwrap();
    assert!(h.manager.begin_image_removal(DATA_IMAGE_ID).is_ok());
}

/// A sub path must name a directory inside the image (a symlink may not lead out), and the
/// image must have been pulled.
#[tokio::test]
async fn image_volume_sub_paths_stay_inside_the_image_and_missing_images_are_refused() {
    needs_root!();
    let h = Harness::new();
    let data = h.dir.path().join("data-image");
    std::fs::create_dir_all(data.join("etc")).unwrap();
    std::fs::write(data.join("etc/file"), "f").unwrap();
    std::os::unix::fs::symlink("../../../..", data.join("up")).unwrap();
    std::os::unix::fs::symlink("/etc", data.join("abs")).unwrap();
    let sid = h.run_pod("p").await;
    for sub_path in ["up", "up/etc", "abs", "missing", "etc/file"] {
        let mut spec = container("c");
        spec.mounts = vec![VolumeMount::default(), image_volume("/img", "data", sub_path)];
        spec.mounts[0] = image_volume("/whole", "data", "");
        let err = h.manager.create_container(&sid, spec).await.unwrap_err();
        assert!(matches!(err, SandboxError::ImageSubPath { index: 1, .. }), "{sub_path}: {err}");
        assert_eq!(crate::cri::code(&err), tonic::Code::InvalidArgument);
        assert!(err.to_string().starts_with("config.mounts[1].image_sub_path"), "{err}");
    }
    let mut spec = container("c");
    spec.mounts = vec![image_volume("/img", "never-pulled", "")];
    let err = h.manager.create_container(&sid, spec).await.unwrap_err();
    assert!(matches!(err, SandboxError::VolumeImageNotFound { index: 0, .. }), "{err}");
    assert_eq!(crate::cri::code(&err), tonic::Code::NotFound);
    assert!(h.manager.list_containers().is_empty());
    assert!(h.manager.begin_image_removal(DATA_IMAGE_ID).is_ok(), "no reservation left");
}

/// rshared volumes: one guest directory per host path for the whole pod (so containers see
/// each other's mounts), a shared container root, and a host path that must itself be on a
/// shared mount (as runc needs).
#[tokio::test]
async fn rshared_volumes_share_one_guest_directory_and_need_a_shared_host_mount() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let volume = h.dir.path().join("volume");
    std::fs::create_dir_all(&volume).unwrap();
    let mut spec = container("c");
    spec.mounts = vec![VolumeMount {
        container_path: "/v".into(),
        host_path: volume.display().to_string(),
        propagation: Propagation::Bidirectional,
        ..Default::default()
    }];
    use nix::mount::{mount, MsFlags};
    let p = volume.as_path();
    let propagation = |flag| mount(None::<&str>, p, None::<&str>, flag, None::<&str>).unwrap();
    mount(Some(p), p, None::<&str>, MsFlags::MS_BIND, None::<&str>).unwrap();
    propagation(MsFlags::MS_PRIVATE);
    let err = h.manager.create_container(&sid, spec.clone()).await.unwrap_err();
    assert!(matches!(err, SandboxError::MountSourceNotShared { .. }), "{err}");
    assert_eq!(crate::cri::code(&err), tonic::Code::InvalidArgument);
    propagation(MsFlags::MS_SHARED);
    let first = h.manager.create_container(&sid, spec.clone()).await;
    spec.name = "d".into();
    let second = h.manager.create_container(&sid, spec).await;
    let sources: Vec<serde_json::Value> = [&first, &second]
        .into_iter()
        .map(|id| {
            let sent = h.agent(&sid).container(id.as_ref().unwrap()).unwrap();
            serde_json::from_slice(&sent.oci_spec_json).unwrap()
        })
        .collect();
    nix::mount::umount2(p, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let mounts: Vec<&serde_json::Value> = sources
        .iter()
        .map(|oci| {
            assert_eq!(oci["linux"]["rootfsPropagation"], "shared");
            oci["mounts"].as_array().unwrap().iter().find(|m| m["destination"] == "/v").unwrap()
        })
        .collect();
    assert_eq!(mounts[0]["source"], mounts[1]["source"]);
    assert!(mounts[0]["source"].as_str().unwrap().starts_with(&format!("{GUEST_VOLUME_DIR}/pod/")));
    assert!(mounts[0]["options"].as_array().unwrap().iter().any(|o| o == "rshared"));
}

#[tokio::test]
async fn a_started_containers_output_reaches_its_log_and_its_exit_its_record() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    assert_eq!(h.manager.container(&cid).unwrap().state, ContainerState::Running);
    let agent = h.agent(&sid);
    agent.emit(&cid, OutputKind::Stdout, b"hello\n");
    agent.emit(&cid, OutputKind::Stderr, b"oops\n");
    agent.exit(&cid, 3);
    let m = h.manager.clone();
    eventually("the exit", || m.container(&cid).unwrap().state == ContainerState::Exited).await;
    let c = h.manager.container(&cid).unwrap();
    assert_eq!((c.exit_code, c.reason.as_str()), (3, "Error"));
    eventually("the log", || h.log_of("c").contains("stderr F oops")).await;
    assert!(h.log_of("c").contains(" stdout F hello"), "{}", h.log_of("c"));
}

#[tokio::test]
async fn a_failed_start_is_recorded_and_a_second_start_refused() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create(&sid, "c").await;
    h.agent(&sid).fail_next("StartContainer");
    assert!(h.manager.start_container(&cid).await.is_err());
    let c = h.manager.container(&cid).unwrap();
    assert_eq!(
        (c.state, c.exit_code, c.reason.as_str()),
        (ContainerState::Exited, 128, "StartError")
    );
    let err = h.manager.start_container(&cid).await.unwrap_err();
    assert!(matches!(err, SandboxError::ContainerNotCreated { .. }), "{err}");
}

#[tokio::test]
async fn stop_sends_sigterm_then_sigkill_after_the_timeout() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let polite = h.create_and_start(&sid, "polite").await;
    h.manager.stop_container(&polite, 5).await.unwrap();
    assert_eq!(h.manager.container(&polite).unwrap().exit_code, 128 + libc::SIGTERM);
    let stubborn = h.create_and_start(&sid, "stubborn").await;
    h.agent(&sid).ignore_sigterm(&stubborn);
    h.manager.stop_container(&stubborn, 1).await.unwrap();
    assert_eq!(h.manager.container(&stubborn).unwrap().exit_code, 128 + libc::SIGKILL);
    // Idempotent, also for what does not exist.
    h.manager.stop_container(&stubborn, 1).await.unwrap();
    h.manager.stop_container("nope", 1).await.unwrap();
    h.manager.remove_container("nope").await.unwrap();
}

#[tokio::test]
async fn removing_a_running_container_kills_and_forgets_it() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    h.manager.remove_container(&cid).await.unwrap();
    assert!(h.manager.container(&cid).is_err());
    assert!(h.agent(&sid).container(&cid).is_none());
    assert!(!h
        .config
        .root
        .join("sandboxes")
        .join(&sid)
        .join("containers")
        .join(format!("{cid}.json"))
        .exists());
    assert!(h.manager.process_io(&crate::agent::ProcessId::init(&cid)).is_none());
}

#[tokio::test]
async fn container_stats_come_from_the_agent() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let agent = h.agent(&sid);
    let first = h.manager.container_stats(&cid).await.unwrap();
    assert_eq!((first.stats.cpu_usage_nanos, first.nano_cores), (42, None));
    agent.set_cpu(&cid, 42 + 50_000_000);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = h.manager.container_stats(&cid).await.unwrap();
    let rate = second.nano_cores.expect("a rate from the second sample");
    // 50 ms of CPU in about 100 ms: about half a core.
    assert!((200_000_000..=600_000_000).contains(&rate), "{rate}");
    let pod = h.manager.pod_stats(&sid).await.unwrap();
    assert_eq!(pod.containers.len(), 1);
    assert_eq!(pod.stats.memory_total_bytes, 256 << 20);
    h.manager.stop_sandbox(&sid).await.unwrap();
    assert!(matches!(h.manager.pod_stats(&sid).await, Err(SandboxError::SandboxNotReady(_))));
}

// Exec.

#[tokio::test]
async fn exec_sync_returns_output_and_exit_code() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let out = h.manager.exec_sync(&cid, vec!["echo".into(), "hi".into()], None).await.unwrap();
    assert_eq!((out.stdout.as_slice(), out.exit_code), (&b"hi\n"[..], 0));
    let out = h.manager.exec_sync(&cid, vec!["exit".into(), "3".into()], None).await.unwrap();
    assert_eq!((out.stderr.as_slice(), out.exit_code), (&b"exiting\n"[..], 3));
}

#[tokio::test]
async fn exec_sync_that_times_out_kills_its_process() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let err = h
        .manager
        .exec_sync(&cid, vec!["sleep".into()], Some(Duration::from_millis(200)))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::ExecTimeout { .. }), "{err}");
    assert!(h.agent(&sid).calls().contains(&"SignalProcess".to_string()));
    let agent = h.agent(&sid);
    eventually("the killed exec to be reaped", || agent.execs() == 0).await;
}

#[tokio::test]
async fn exec_needs_a_running_container_with_a_readable_process() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let created = h.create(&sid, "c").await;
    let err = h.manager.exec_sync(&created, vec!["echo".into()], None).await.unwrap_err();
    assert!(matches!(err, SandboxError::ContainerNotRunning(_)), "{err}");
    let err = h.manager.exec_sync("nope", vec!["echo".into()], None).await.unwrap_err();
    assert!(matches!(err, SandboxError::ContainerNotFound(_)), "{err}");
    let cid = h.create_and_start(&sid, "d").await;
    h.manager.update_container(&cid, |c| c.oci_process_json = "{not json".into()).await.unwrap();
    let err = h.manager.exec_sync(&cid, vec!["echo".into()], None).await.unwrap_err();
    assert!(matches!(err, SandboxError::StoredProcess { .. }), "{err}");
    assert!(
        !h.agent(&sid).calls().contains(&"ExecProcess".to_string()),
        "never run as root with no env"
    );
}

#[tokio::test]
async fn many_exec_syncs_leave_no_io_hub_or_exec_behind() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    for i in 0..200 {
        let out = h.manager.exec_sync(&cid, vec!["lines".into(), "3".into()], None).await.unwrap();
        assert_eq!(out.stdout, b"0\n1\n2\n", "exec {i}");
    }
    let m = h.manager.clone();
    eventually("exec hubs to go", || lock(&m.io).len() == 1).await;
    assert_eq!(h.agent(&sid).execs(), 0);
}

#[tokio::test]
async fn an_exec_session_streams_output_and_takes_stdin() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let stdio = StdioMode { stdin: true, stdin_once: false, tty: true };
    let mut session = h.manager.exec(&cid, vec!["echo".into(), "tty".into()], stdio).await.unwrap();
    session.io.write_stdin(b"typed".to_vec()).await.unwrap();
    session.io.resize(100, 30).await.unwrap();
    let chunk = session.output.recv().await.unwrap();
    assert_eq!(chunk.data, b"tty\n");
    assert!(session.output.recv().await.is_none());
    assert_eq!(session.wait().await.unwrap().exit_code, 0);
    let sent = h.agent(&sid).calls();
    assert!(sent.contains(&"WriteStdin".to_string()) && sent.contains(&"ResizeTty".to_string()));
}

// Restarts and concurrency.

#[tokio::test]
async fn a_restarted_daemon_reattaches_to_running_pods_and_follows_containers() {
    needs_root!();
    let mut h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    h.agent(&sid).emit(&cid, OutputKind::Stdout, b"before\n");
    eventually("the first line", || h.log_of("c").contains("before")).await;
    h.restart().await;
    assert_eq!(h.manager.sandbox(&sid).unwrap().state, SandboxState::Ready);
    let agent = h.agent(&sid);
    agent.emit(&cid, OutputKind::Stdout, b"after\n");
    agent.exit(&cid, 0);
    let m = h.manager.clone();
    eventually("the exit after restart", || {
        m.container(&cid).unwrap().state == ContainerState::Exited
    })
    .await;
    eventually("the second line", || h.log_of("c").contains("after")).await;
    assert_eq!(h.log_of("c").matches("before").count(), 1, "no line repeated: {}", h.log_of("c"));
    h.manager.remove_sandbox(&sid).await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn a_vm_that_died_while_the_daemon_was_away_is_recovered_as_not_ready() {
    needs_root!();
    let mut h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let vm = h.manager.sandbox(&sid).unwrap().vm.unwrap();
    // The daemon goes away between two steps; the VM dies meanwhile.
    h.manager = Harness::manager(&h.config, &h.hv, &h.dialer, &h.dir.path().join("image"));
    h.hv.kill(&vm);
    h.manager.recover().await.unwrap();
    let sb = h.manager.sandbox(&sid).unwrap();
    assert_eq!((sb.state, sb.vm.is_none()), (SandboxState::NotReady, true));
    let c = h.manager.container(&cid).unwrap();
    assert_eq!((c.state, c.reason.as_str()), (ContainerState::Exited, "VMExited"));
    h.manager.remove_sandbox(&sid).await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn records_of_schema_0_are_recovered_and_listed() {
    needs_root!();
    let mut h = Harness::new();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/records-v0/sandboxes");
    for entry in std::fs::read_dir(&fixture).unwrap().flatten() {
        let to = h.config.root.join("sandboxes").join(entry.file_name());
        std::fs::create_dir_all(to.join("containers")).unwrap();
        std::fs::copy(entry.path().join("sandbox.json"), to.join("sandbox.json")).unwrap();
        for c in std::fs::read_dir(entry.path().join("containers")).unwrap().flatten() {
            std::fs::copy(c.path(), to.join("containers").join(c.file_name())).unwrap();
        }
        // A temporary file of an interrupted write is no record.
        std::fs::write(to.join("containers/.x.json.tmp-1-2"), b"{").unwrap();
    }
    // Its recorded backend is "qemu": the registry must find it by that name.
    let qemu = FakeHypervisor::named("qemu", &h.config.state);
    h.manager = SandboxManager::new(
        h.config.clone(),
        Arc::new(
            Registry::new(h.hv.clone())
                .with_factory("qemu", move || Ok(qemu.clone() as Arc<dyn Hypervisor>)),
        ),
        h.dialer.clone(),
        Arc::new(FakeImages { rootfs: h.dir.path().join("image") }),
    );
    h.manager.recover().await.unwrap();
    let pods = h.manager.list_sandboxes();
    assert_eq!(pods.len(), 1);
    assert_eq!(
        (pods[0].metadata.name.as_str(), pods[0].state),
        ("legacy-pod", SandboxState::NotReady)
    );
    assert_eq!(pods[0].share_layout, ShareLayout::Single);
    let containers = h.manager.list_containers();
    assert_eq!(containers.len(), 1);
    assert_eq!(containers[0].reason, "VMExited");
    h.manager.remove_sandbox(&pods[0].id).await.unwrap();
    h.assert_nothing_left();
}

#[tokio::test]
async fn concurrent_creates_in_one_pod_all_land() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let creates = (0..8).map(|i| {
        let m = h.manager.clone();
        let sid = sid.clone();
        tokio::spawn(async move { m.create_container(&sid, container(&format!("c{i}"))).await })
    });
    for c in futures::future::join_all(creates).await {
        c.unwrap().unwrap();
    }
    assert_eq!(h.manager.list_containers().len(), 8);
    // A stop racing a create: the create lands before the stop or is refused after it.
    let (m1, m2) = (h.manager.clone(), h.manager.clone());
    let (s1, s2) = (sid.clone(), sid.clone());
    let stop = tokio::spawn(async move { m1.stop_sandbox(&s1).await });
    let create = tokio::spawn(async move { m2.create_container(&s2, container("late")).await });
    stop.await.unwrap().unwrap();
    match create.await.unwrap() {
        Ok(cid) => assert_eq!(h.manager.container(&cid).unwrap().state, ContainerState::Exited),
        Err(e) => assert!(matches!(e, SandboxError::SandboxNotReady(_)), "{e}"),
    }
}

#[tokio::test]
async fn a_hung_agent_does_not_block_another_pod() {
    needs_root!();
    let h = Harness::new();
    let slow = h.run_pod("slow").await;
    let slow_cid = h.create_and_start(&slow, "c").await;
    let fast = h.run_pod("fast").await;
    h.agent(&slow).hang("ContainerStats");
    let m = h.manager.clone();
    let hung = tokio::spawn(async move { m.container_stats(&slow_cid).await });
    let done = tokio::time::timeout(Duration::from_secs(5), async {
        let cid = h.create_and_start(&fast, "c").await;
        h.manager.exec_sync(&cid, vec!["echo".into(), "ok".into()], None).await.unwrap()
    })
    .await
    .expect("the other pod was held up");
    assert_eq!(done.stdout, b"ok\n");
    assert!(!hung.is_finished());
    hung.abort();
}

// Events, OOM, live resources.

#[tokio::test]
async fn every_state_change_emits_an_event() {
    needs_root!();
    use events::EventKind::{Created, Deleted, Started, Stopped};
    let h = Harness::new();
    let mut events = h.manager.subscribe_events();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    h.agent(&sid).exit(&cid, 0);
    let m = h.manager.clone();
    eventually("the exit", || m.container(&cid).unwrap().state == ContainerState::Exited).await;
    h.manager.remove_sandbox(&sid).await.unwrap();
    let mut seen = Vec::new();
    let mut last = None;
    while let Ok(e) = events.try_recv() {
        seen.push((e.container_id == sid, e.kind));
        last = Some(e);
    }
    // A deletion carries what was deleted: its records are gone from the store.
    let deleted = last.unwrap().last.expect("the pod's last records");
    assert_eq!(deleted.sandbox.as_ref().map(|s| s.id.as_str()), Some(sid.as_str()));
    assert_eq!(deleted.containers.len(), 1);
    assert_eq!(
        seen,
        vec![
            (true, Created),
            (true, Started),
            (false, Created),
            (false, Started),
            (false, Stopped),
            (true, Stopped),
            (false, Deleted),
            (true, Deleted),
        ]
    );
}

#[tokio::test]
async fn a_vm_that_dies_emits_stopped_events_for_the_pod_and_its_containers() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let mut events = h.manager.subscribe_events();
    h.hv.kill(&h.manager.sandbox(&sid).unwrap().vm.unwrap());
    let mut stopped = Vec::new();
    while stopped.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(5), events.recv()).await.unwrap().unwrap();
        if e.kind == events::EventKind::Stopped {
            stopped.push(e.container_id);
        }
    }
    assert!(stopped.contains(&cid) && stopped.contains(&sid), "{stopped:?}");
}

#[tokio::test]
async fn an_oom_kill_is_reported_as_oomkilled_137() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    h.agent(&sid).oom_kill(&cid);
    let m = h.manager.clone();
    eventually("the exit", || m.container(&cid).unwrap().state == ContainerState::Exited).await;
    let c = h.manager.container(&cid).unwrap();
    assert_eq!((c.exit_code, c.reason.as_str()), (137, "OOMKilled"));
}

#[tokio::test]
async fn resources_are_updated_in_the_guest_and_recorded_and_must_fit_the_vm() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let cid = h.create_and_start(&sid, "c").await;
    let wanted = Resources {
        memory_limit_bytes: 64 << 20,
        cpu_quota: 50_000,
        cpu_period: 100_000,
        ..Default::default()
    };
    h.manager.update_container_resources(&cid, wanted.clone()).await.unwrap();
    let applied = h.agent(&sid).updated(&cid).unwrap();
    assert_eq!(applied["memory"]["limit"], 64 << 20);
    assert_eq!(applied["cpu"]["quota"], 50_000);
    assert_eq!(h.manager.container(&cid).unwrap().resources, Some(wanted));
    // The fake's VM has the default 256 MiB.
    let too_big = Resources { memory_limit_bytes: 1 << 30, ..Default::default() };
    let err = h.manager.update_container_resources(&cid, too_big.clone()).await.unwrap_err();
    assert!(matches!(err, SandboxError::LimitExceedsVm { .. }), "{err}");
    assert_eq!(crate::cri::code(&err), tonic::Code::InvalidArgument);
    let mut spec = container("big");
    spec.resources = Some(too_big);
    let err = h.manager.create_container(&sid, spec).await.unwrap_err();
    assert!(matches!(err, SandboxError::LimitExceedsVm { .. }), "{err}");
    h.agent(&sid).exit(&cid, 0);
    let m = h.manager.clone();
    eventually("the exit", || m.container(&cid).unwrap().state == ContainerState::Exited).await;
    let err = h.manager.update_container_resources(&cid, Resources::default()).await.unwrap_err();
    assert!(matches!(err, SandboxError::ContainerNotRunning(_)), "{err}");
}

/// A daemon killed while RunPodSandbox waited for the guest: the restarted daemon stops the
/// VM and forgets the pod (its caller never got its id), leaving nothing behind.
#[tokio::test]
async fn a_start_the_daemon_did_not_live_to_finish_is_undone_at_restart() {
    needs_root!();
    let mut h = Harness::new();
    h.hv.behave().never_ready = true;
    let m = h.manager.clone();
    let pod = h.pod("p");
    let start = tokio::spawn(async move { m.run_sandbox(pod).await });
    let hv = h.hv.clone();
    eventually("the VM to start", || hv.running() == 1).await;
    // The daemon dies: the start never finishes, its record stays as it was on disk.
    start.abort();
    let _ = start.await;
    h.restart().await;
    assert!(h.manager.list_sandboxes().is_empty(), "the interrupted pod is gone");
    h.assert_nothing_left();
    // Its name is free again.
    h.run_pod("p").await;
}

/// A record reaches the disk before any side effect, marked `creating` until the start
/// answered.
#[tokio::test]
async fn the_record_says_a_start_is_under_way_until_it_answered() {
    needs_root!();
    let h = Harness::new();
    let path = h.config.root.join("sandboxes");
    let m = h.manager.clone();
    let pod = h.pod("q");
    h.hv.behave().never_ready = true;
    let start = tokio::spawn(async move { m.run_sandbox(pod).await });
    let hv = h.hv.clone();
    eventually("the VM to start", || hv.running() == 1).await;
    let spec = h.hv.behave().specs.pop().unwrap();
    let rec = load_sandbox(&path.join(&spec.sandbox_id).join("sandbox.json")).unwrap();
    assert!(rec.creating, "the record says the start is under way");
    start.abort();
    let sid = h.run_pod("r").await;
    let rec = load_sandbox(&path.join(&sid).join("sandbox.json")).unwrap();
    assert!(!rec.creating);
}

/// What a killed RemovePodSandbox or start leaves and no record owns is swept at start-up:
/// record directories without sandbox.json, temporary files, VM run directories and the
/// processes naming them, pods' state directories with their mounts, network namespace pins.
#[tokio::test]
async fn a_restart_sweeps_what_no_record_owns() {
    needs_root!();
    let mut h = Harness::new();
    let sid = h.run_pod("kept").await;
    let stray = new_id();
    let records = h.config.root.join("sandboxes");
    std::fs::create_dir_all(records.join(&stray).join("containers")).unwrap();
    std::fs::write(records.join(&stray).join("containers/c.json"), "{}").unwrap();
    let tmp = records.join(&sid).join(".sandbox.json.tmp-1-0");
    std::fs::write(&tmp, "{").unwrap();
    // A pod state directory with a bind mount below it.
    let state = h.config.state.join("sandboxes").join(&stray);
    let stray_share = PodResources::new(&state, ShareLayout::Split);
    stray_share.create().unwrap();
    stray_share.bind_image("sha256:0123", &h.dir.path().join("image")).unwrap();
    // A run directory with a helper process naming it.
    let run_dir = h.config.vms_dir().join(&stray[..16]);
    std::fs::create_dir_all(&run_dir).unwrap();
    let mut helper = std::process::Command::new("sh")
        .args(["-c", "sleep 30", &run_dir.display().to_string()])
        .spawn()
        .unwrap();
    // A network namespace pin.
    let netns = h.config.netns_dir();
    std::fs::create_dir_all(&netns).unwrap();
    crate::resource::network::netns::create(&netns.join(&stray)).unwrap();

    h.restart().await;
    assert!(!records.join(&stray).exists(), "half-removed record directory");
    assert!(!tmp.exists(), "temporary file");
    assert!(!state.exists(), "pod state directory");
    assert!(!run_dir.exists(), "VM run directory");
    assert!(!netns.join(&stray).exists(), "network namespace pin");
    let reaped = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if helper.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    assert!(reaped.await.is_ok(), "the helper naming the run directory was stopped");
    assert_eq!(h.manager.sandbox(&sid).unwrap().state, SandboxState::Ready, "owned pod kept");
    h.manager.remove_sandbox(&sid).await.unwrap();
    h.assert_nothing_left();
}

/// A VM found dead at start-up whose helpers cannot be stopped stays recorded (NotReady):
/// forgetting it would orphan live processes. StopPodSandbox retries.
#[tokio::test]
async fn a_failed_stop_at_recovery_keeps_the_vm_recorded() {
    needs_root!();
    let mut h = Harness::new();
    let sid = h.run_pod("p").await;
    let vm = h.manager.sandbox(&sid).unwrap().vm.unwrap();
    h.manager = Harness::manager(&h.config, &h.hv, &h.dialer, &h.dir.path().join("image"));
    h.hv.kill(&vm);
    h.hv.behave().failing_stops = 1;
    h.manager.recover().await.unwrap();
    let sb = h.manager.sandbox(&sid).unwrap();
    assert_eq!(sb.state, SandboxState::NotReady);
    assert_eq!(sb.vm.as_ref(), Some(&vm), "the VM stays recorded for a retry");
    h.manager.stop_sandbox(&sid).await.unwrap();
    assert!(h.manager.sandbox(&sid).unwrap().vm.is_none());
    h.manager.remove_sandbox(&sid).await.unwrap();
    h.assert_nothing_left();
}

/// RemoveImage while CreateContainer waits for the agent: the image is held from before the
/// bind, so the removal is refused, and a create of an image being removed is refused.
#[tokio::test]
async fn an_image_is_held_from_the_start_of_create_container() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    h.agent(&sid).hang("CreateContainer");
    let m = h.manager.clone();
    let sid2 = sid.clone();
    let create = tokio::spawn(async move { m.create_container(&sid2, container("c")).await });
    let agent = h.agent(&sid);
    eventually("the create to reach the agent", || {
        agent.calls().contains(&"CreateContainer".to_string())
    })
    .await;
    let user = h.manager.begin_image_removal("sha256:feedbeef").err();
    assert!(user.is_some(), "RemoveImage must see the container being created");
    create.abort();
    let _ = create.await;
    let removal = h.manager.begin_image_removal("sha256:feedbeef").expect("no user left");
    let err = h.manager.create_container(&sid, container("d")).await.unwrap_err();
    assert!(matches!(err, SandboxError::ImageNotFound(_)), "{err}");
    drop(removal);
    assert!(h.manager.begin_image_removal("sha256:feedbeef").is_ok());
}

/// An image removed and pulled again is a new tree: a pod that had bound the old one binds
/// the new one (at a path of its own: the guest may cache the old), not the emptied old one.
#[tokio::test]
async fn a_re_pulled_image_is_bound_anew_not_seen_empty() {
    needs_root!();
    let h = Harness::new();
    let sid = h.run_pod("p").await;
    let first = h.create(&sid, "c").await;
    h.manager.remove_container(&first).await.unwrap();
    let rootfs = h.dir.path().join("image");
    std::fs::remove_dir_all(&rootfs).unwrap();
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    std::fs::write(rootfs.join("new-file"), "pulled again").unwrap();
    let second = h.create(&sid, "c2").await;
    let lower = &h.agent(&sid).container(&second).unwrap().lower_dirs[0];
    let seen = h.config.state.join("sandboxes").join(&sid).join("share/mounts").join(lower);
    assert_eq!(
        std::fs::read_to_string(seen.join("new-file")).ok().as_deref(),
        Some("pulled again"),
        "the pod's share shows the image as pulled now ({lower})"
    );
    h.manager.remove_sandbox(&sid).await.unwrap();
    h.assert_nothing_left();
}

/// Many pods started at once boot in turns (two per host CPU), so an overloaded host does not
/// starve every guest past its timeout; all of them start.
#[tokio::test]
async fn pods_started_at_once_boot_in_turns() {
    needs_root!();
    let h = Harness::new();
    h.hv.behave().ready_delay = Duration::from_millis(50);
    let slots = super::boot_slots() as u32;
    let starts = (0..3 * slots).map(|n| h.manager.run_sandbox(h.pod(&format!("p{n}"))));
    let ids = futures::future::join_all(starts).await;
    assert!(ids.iter().all(|r| r.is_ok()), "{ids:?}");
    let max = h.hv.behave().max_booting;
    assert!(max <= slots, "{max} guests booted at once, past {slots} slots");
}
