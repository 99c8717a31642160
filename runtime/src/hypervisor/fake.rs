//! A hypervisor that boots nothing, for fast tests of the sandbox layer: its "VMs" are entries
//! in a table that a test can kill, and it can be told to fail a start, a boot or a stop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{
    AgentReady, GuestConnector, Hypervisor, HypervisorError, PreparedVm, Result, RunRoot, VmHandle,
    VmSpec,
};

/// What the fake is told to do, and what it saw.
#[derive(Default)]
pub struct FakeBehaviour {
    /// The next start fails.
    pub fail_start: bool,
    /// The guest of the next start never says it is ready.
    pub never_ready: bool,
    /// The guest of the next start dies while booting.
    pub die_while_booting: bool,
    /// This many stops fail (and leave the VM running).
    pub failing_stops: u32,
    /// Every guest takes this long to say it is ready.
    pub ready_delay: Duration,
    /// Guests waiting to be ready now, and the most there ever were at once.
    pub booting: u32,
    pub max_booting: u32,
    pub starts: u32,
    pub stops: u32,
    /// Specs of the VMs started, in order.
    pub specs: Vec<VmSpec>,
    /// What `template_refusal` answers.
    pub template_refusal: Option<String>,
    /// The next restore fails.
    pub fail_restore: bool,
    pub pauses: u32,
    pub snapshots: u32,
    /// The snapshot directory of each restore, in order.
    pub restores: Vec<PathBuf>,
}

pub struct FakeHypervisor {
    name: &'static str,
    root: RunRoot,
    /// Running VMs by run directory; the sender says "exited" when it turns true.
    vms: Mutex<HashMap<PathBuf, watch::Sender<bool>>>,
    /// Guest memory of each VM started, MiB (what a snapshot writes).
    memory: Mutex<HashMap<PathBuf, u32>>,
    pub behaviour: Arc<Mutex<FakeBehaviour>>,
}

impl FakeHypervisor {
    pub fn new(root: &Path) -> Arc<Self> {
        Self::named("fake", root)
    }

    pub fn named(name: &'static str, root: &Path) -> Arc<Self> {
        Arc::new(Self {
            name,
            root: RunRoot(root.join("vms")),
            vms: Mutex::new(HashMap::new()),
            memory: Mutex::new(HashMap::new()),
            behaviour: Arc::default(),
        })
    }

    pub fn behave(&self) -> std::sync::MutexGuard<'_, FakeBehaviour> {
        self.behaviour.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vms(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, watch::Sender<bool>>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM dies on its own (its VMM crashed).
    pub fn kill(&self, vm: &VmHandle) {
        if let Some(tx) = self.vms().remove(&vm.run_dir) {
            let _ = tx.send(true);
        }
    }

    /// How many VMs run.
    pub fn running(&self) -> usize {
        self.vms().len()
    }
}

/// Ready after the fake's `ready_delay`, never, or with the VM dying first.
struct FakeReady {
    never: bool,
    behaviour: Arc<Mutex<FakeBehaviour>>,
}

impl FakeReady {
    fn behave(&self) -> std::sync::MutexGuard<'_, FakeBehaviour> {
        self.behaviour.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl AgentReady for FakeReady {
    async fn wait(&self, timeout: Duration, vm_exited: BoxFuture<'static, ()>) -> Result<()> {
        if !self.never {
            let delay = {
                let mut b = self.behave();
                b.booting += 1;
                b.max_booting = b.max_booting.max(b.booting);
                b.ready_delay
            };
            tokio::time::sleep(delay).await;
            self.behave().booting -= 1;
            return Ok(());
        }
        tokio::select! {
            () = vm_exited => Err(HypervisorError::ExitedBeforeReady),
            () = tokio::time::sleep(timeout) => Err(HypervisorError::AgentNotReady { port: 1025, timeout }),
        }
    }
}

/// The fake agent dialer ignores the connector; this one says what it would dial.
#[derive(Debug)]
pub struct FakeConnector(pub PathBuf);

#[async_trait]
impl GuestConnector for FakeConnector {
    async fn dial(&self) -> Result<tokio::net::UnixStream> {
        Err(HypervisorError::VsockConnect {
            port: 1024,
            path: self.0.clone(),
            source: std::io::Error::other("the fake hypervisor has no guests to dial"),
        })
    }

    async fn dial_port(&self, port: u32) -> Result<tokio::net::UnixStream> {
        Err(HypervisorError::VsockConnect {
            port,
            path: self.0.clone(),
            source: std::io::Error::other("the fake hypervisor has no guests to dial"),
        })
    }

    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

#[async_trait]
impl Hypervisor for FakeHypervisor {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn prepare(&self, sandbox_id: &str) -> Result<PreparedVm> {
        let run_dir = self.root.run_dir(sandbox_id)?;
        std::fs::create_dir_all(&run_dir)
            .map_err(|source| HypervisorError::RunDir { path: run_dir.clone(), source })?;
        let never = {
            let b = self.behave();
            b.never_ready || b.die_while_booting
        };
        Ok(PreparedVm::new(
            run_dir,
            Box::new(FakeReady { never, behaviour: self.behaviour.clone() }),
        ))
    }

    async fn start(&self, prepared: &PreparedVm, spec: &VmSpec) -> Result<VmHandle> {
        let die = {
            let mut b = self.behave();
            b.starts += 1;
            b.specs.push(spec.clone());
            if std::mem::take(&mut b.fail_start) {
                return Err(HypervisorError::Spawn {
                    what: "fake vmm".into(),
                    source: std::io::Error::other("told to fail"),
                });
            }
            b.never_ready = false;
            std::mem::take(&mut b.die_while_booting)
        };
        let run_dir = prepared.run_dir().to_path_buf();
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run_dir.clone(), spec.memory_mib);
        let (tx, _) = watch::channel(false);
        let vm = VmHandle {
            backend: self.name.to_string(),
            vsock_uds: run_dir.join("vsock.sock"),
            run_dir: run_dir.clone(),
            processes: vec![],
        };
        // A guest that dies while booting leaves a VM that has already exited.
        if !die {
            self.vms().insert(run_dir, tx);
        }
        Ok(vm)
    }

    fn exited(&self, vm: &VmHandle) -> BoxFuture<'static, ()> {
        let rx = self.vms().get(&vm.run_dir).map(|tx| tx.subscribe());
        Box::pin(async move {
            if let Some(mut rx) = rx {
                let _ = rx.wait_for(|exited| *exited).await;
            }
        })
    }

    /// As the real backends: stops processes naming the run directory and removes it.
    async fn reclaim_interrupted_start(&self, sandbox_id: &str) -> Result<()> {
        let run_dir = self.root.run_dir(sandbox_id)?;
        self.vms().remove(&run_dir);
        super::process::reclaim_interrupted_start(&run_dir).await
    }

    fn is_running(&self, vm: &VmHandle) -> bool {
        self.vms().contains_key(&vm.run_dir)
    }

    fn agent_connector(&self, vm: &VmHandle) -> Arc<dyn GuestConnector> {
        Arc::new(FakeConnector(vm.vsock_uds.clone()))
    }

    fn template_refusal(&self, _spec: &VmSpec) -> Option<String> {
        self.behave().template_refusal.clone()
    }

    async fn pause(&self, _vm: &VmHandle) -> Result<()> {
        self.behave().pauses += 1;
        Ok(())
    }

    async fn resume(&self, _vm: &VmHandle) -> Result<()> {
        Ok(())
    }

    /// Writes what the built-in VMM writes: `vm.state`, then `memory.bin` of the guest's size
    /// (sparse).
    async fn snapshot(&self, vm: &VmHandle, dir: &Path) -> Result<()> {
        let memory_mib =
            self.memory.lock().unwrap_or_else(|p| p.into_inner()).get(&vm.run_dir).copied();
        let io = |source| HypervisorError::RunDir { path: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(dir.join("vm.state"), b"PVSNAPST fake state").map_err(io)?;
        let memory = std::fs::File::create(dir.join("memory.bin")).map_err(io)?;
        memory.set_len(u64::from(memory_mib.unwrap_or(0)) << 20).map_err(io)?;
        self.behave().snapshots += 1;
        Ok(())
    }

    async fn restore(&self, prepared: &PreparedVm, spec: &VmSpec, dir: &Path) -> Result<VmHandle> {
        {
            let mut b = self.behave();
            if std::mem::take(&mut b.fail_restore) {
                return Err(HypervisorError::Spawn {
                    what: "fake vmm".into(),
                    source: std::io::Error::other("told to fail the restore"),
                });
            }
            b.restores.push(dir.to_path_buf());
        }
        let run_dir = prepared.run_dir().to_path_buf();
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(run_dir.clone(), spec.memory_mib);
        let (tx, _) = watch::channel(false);
        self.vms().insert(run_dir.clone(), tx);
        Ok(VmHandle {
            backend: self.name.to_string(),
            vsock_uds: run_dir.join("vsock.sock"),
            run_dir,
            processes: vec![],
        })
    }

    async fn stop(&self, vm: &VmHandle, _grace: Duration) -> Result<()> {
        {
            let mut b = self.behave();
            b.stops += 1;
            if b.failing_stops > 0 {
                b.failing_stops -= 1;
                return Err(HypervisorError::Stop("told to fail".into()));
            }
        }
        self.kill(vm);
        Ok(())
    }
}
