//! Crash consistency at start-up. A pod's record reaches the disk before anything is made for
//! it (shares, CNI, VMM), and it goes last, after everything it owned. So after a daemon was
//! killed at any point:
//! - a record still marked `creating` is a RunPodSandbox that never answered: everything it
//!   may have made is undone and the pod is forgotten ([`SandboxManager::undo_interrupted_starts`]);
//! - what no record names is what a killed RemovePodSandbox (or an older daemon's interrupted
//!   start) left: it is swept ([`SandboxManager::sweep_unowned`]) — record directories without
//!   their `sandbox.json`, temporary files of interrupted writes, VM run directories (and the
//!   processes naming them), pods' state directories (and the mounts below them), and network
//!   namespace pins.

use std::collections::HashSet;
use std::path::Path;

use tracing::{info, warn};

use super::*;

impl SandboxManager {
    /// Undoes every start a killed daemon left half done (records still `creating`).
    pub(super) async fn undo_interrupted_starts(&self) {
        let interrupted: Vec<String> =
            self.list_sandboxes().into_iter().filter(|s| s.creating).map(|s| s.id).collect();
        for id in interrupted {
            match self.teardown_vm(&id).await {
                Ok(()) => {
                    info!(sandbox = %id, "undid a pod start the daemon did not live to finish");
                    self.forget_failed_start(&id).await;
                }
                Err(e) => {
                    // Keep it, NotReady: RemovePodSandbox (kubelet's GC) retries the clean-up.
                    warn!(sandbox = %id, error = %e, "undoing an interrupted pod start; keeping its record");
                    let _ = self
                        .update_sandbox(&id, |r| {
                            r.creating = false;
                            r.state = SandboxState::NotReady;
                        })
                        .await;
                }
            }
        }
    }

    /// Removes what no record owns (see the module's documentation).
    pub(super) async fn sweep_unowned(&self) {
        let known: HashSet<String> = lock(&self.state).sandboxes.keys().cloned().collect();
        sweep_record_dirs(&self.config.root.join("sandboxes"));
        for dir in unowned_entries(&self.config.state.join("sandboxes"), &known, |n, id| n == id) {
            info!(path = %dir.display(), "sweeping a pod state directory no record owns");
            if let Err(e) = crate::resource::PodResources::sweep(&dir) {
                warn!(path = %dir.display(), error = %e, "sweeping a pod state directory");
            }
        }
        // Run directories are named by the first 16 digits of the sandbox id.
        let hypervisor = self.hypervisors.default_backend();
        for dir in unowned_entries(&self.config.vms_dir(), &known, |n, id| id.starts_with(n)) {
            let name =
                dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            info!(path = %dir.display(), "sweeping a VM run directory no record owns");
            if let Err(e) = hypervisor.reclaim_interrupted_start(&name).await {
                warn!(path = %dir.display(), error = %e, "sweeping a VM run directory");
            }
        }
        for pin in self.networks.sweep_pins(&known) {
            info!(path = %pin.display(), "removed a network namespace pin no record owns");
        }
    }
}

/// The entries of `dir` that `owns(name, id)` matches for no known sandbox id.
fn unowned_entries(
    dir: &Path,
    known: &HashSet<String>,
    owns: impl Fn(&str, &str) -> bool,
) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !known.iter().any(|id| owns(&name, id))
        })
        .map(|e| e.path())
        .collect()
}

/// Removes record directories without a `sandbox.json` (a RemovePodSandbox killed while it
/// deleted the directory) and temporary files of interrupted writes. A directory whose
/// record is there but unreadable (corrupt, or from a newer daemon) is left alone.
fn sweep_record_dirs(sandboxes: &Path) {
    let Ok(entries) = std::fs::read_dir(sandboxes) else { return };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !dir.join("sandbox.json").exists() {
            info!(path = %dir.display(), "removing a half-removed sandbox record directory");
            if let Err(e) = store::remove_path(&dir) {
                warn!(path = %dir.display(), error = %e, "removing a sandbox record directory");
            }
            continue;
        }
        for d in [dir.clone(), dir.join("containers")] {
            for tmp in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if store::is_temporary(&tmp.path()) {
                    let _ = store::remove_path(&tmp.path());
                }
            }
        }
    }
}
