//! Pod sandboxes: RunPodSandbox boots the pod's VM with its resources and sets the guest up;
//! StopPodSandbox and RemovePodSandbox take it down; a watcher notices a VM that dies on its
//! own; recovery re-attaches to the VMs a previous daemon started.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::handlers::{Handler, VmSize, MAX_VCPUS, MAX_VM_MIB};
use super::templates::{self, StartPlan};
use super::*;
use crate::agent::SandboxSetup;
use crate::hypervisor::{HostNamespaces, VmHandle, VmSpec};
use crate::metrics::{self, PodStartPhase};
use crate::resource::network::{NetworkRecord, NetworkRequest};
use crate::resource::ShareLayout;

/// How long a VM may take to stop before it is killed.
const VM_STOP_GRACE: Duration = Duration::from_secs(3);
/// Lines of the guest console quoted when a boot fails.
const CONSOLE_TAIL_LINES: usize = 15;
/// Bytes of the console's end read to find them: the log may be megabytes.
const CONSOLE_TAIL_BYTES: u64 = 16 * 1024;
/// Bytes of the console's start searched for the kernel's hand-over to the agent.
const CONSOLE_HEAD_BYTES: u64 = 256 * 1024;

impl SandboxManager {
    /// RunPodSandbox: boots the pod's VM and prepares it. Returns the sandbox id.
    pub async fn run_sandbox(self: &Arc<Self>, mut pod: PodSpec) -> Result<String> {
        let arrived = std::time::Instant::now();
        pod.runtime_handler = Handler::routed_name(&self.config, &pod);
        let handler = self.handler(&pod.runtime_handler)?;
        if let Some(field) = handler.refused_namespace(&pod) {
            return Err(SandboxError::HostNamespaceInVm { field });
        }
        // The host handler's containers would create their mount points inside the user
        // namespace in image trees that belong to the host's unmapped root.
        if handler.on_host() && pod.user_namespace.is_some() {
            return Err(SandboxError::UserNamespaceOnHost);
        }
        let size = handler.vm_size(&pod);
        if !handler.on_host() && (size.memory_mib > MAX_VM_MIB || size.vcpus > MAX_VCPUS) {
            return Err(SandboxError::VmTooLarge {
                vcpus: size.vcpus,
                memory_mib: size.memory_mib,
                max_vcpus: MAX_VCPUS,
                max_mib: MAX_VM_MIB,
            });
        }
        let id = new_id();
        let saved = {
            let mut st = lock(&self.state);
            if let Some(existing) = st.sandboxes.values().find(|s| s.metadata == pod.metadata) {
                return Err(SandboxError::SandboxExists {
                    namespace: pod.metadata.namespace.clone(),
                    name: pod.metadata.name.clone(),
                    attempt: pod.metadata.attempt,
                    existing: existing.id.clone(),
                });
            }
            // Reserve the name while the VM boots, and persist the reservation before any
            // side effect: a daemon killed from here on finds what to undo.
            let mut rec = new_record(&id, &pod);
            rec.vm_size = Some(size);
            st.sandboxes.insert(id.clone(), rec.clone());
            self.save_sandbox(&rec)
        };
        if let Err(e) = saved.done().await {
            lock(&self.state).sandboxes.remove(&id);
            return Err(e.into());
        }
        self.events.emit(&id, &id, events::EventKind::Created);
        let guard = self.sandbox_lock(&id);
        let _op = guard.lock().await;
        match self.boot_sandbox(&id, &pod, &handler, size).await {
            Ok(()) => {
                let rec = self
                    .update_sandbox(&id, |r| {
                        r.state = SandboxState::Ready;
                        r.creating = false;
                    })
                    .await?;
                info!(
                    sandbox = %id,
                    pod = %format!("{}/{}", rec.metadata.namespace, rec.metadata.name),
                    backend = rec.vm.as_ref().map(|v| v.backend.as_str()).unwrap_or_default(),
                    "pod sandbox ready"
                );
                self.watch_vm(&id);
                metrics::global().pod_start_phase(PodStartPhase::PodReady, arrived.elapsed());
                Ok(id)
            }
            Err(e) => {
                warn!(sandbox = %id, error = %e, "pod sandbox failed to start; cleaning up");
                if let Err(cleanup) = self.teardown_vm(&id).await {
                    // Keep the (NotReady) record so StopPodSandbox/RemovePodSandbox, or
                    // kubelet's garbage collection, can finish the clean-up (CNI DEL).
                    warn!(sandbox = %id, error = %cleanup, "cleaning up a pod sandbox that failed; keeping its record");
                    let _ = self
                        .update_sandbox(&id, |r| {
                            r.state = SandboxState::NotReady;
                            r.creating = false;
                        })
                        .await;
                    return Err(e);
                }
                self.forget_failed_start(&id).await;
                Err(e)
            }
        }
    }

    /// Forgets a pod whose start failed and was undone: its records and state directory.
    pub(super) async fn forget_failed_start(&self, id: &str) {
        let (last, removed) = {
            let mut st = lock(&self.state);
            (st.sandboxes.remove(id), self.remove_record(&self.sandbox_record_dir(id)))
        };
        let _ = removed.done().await;
        let _ = store::remove_path(&self.sandbox_state_dir(id));
        lock(&self.sandbox_locks).remove(id);
        let last = events::LastRecords { sandbox: last, containers: Vec::new() };
        self.events.emit_deleted(id, id, last);
    }

    /// UpdatePodSandboxResources (in-place pod resize): the pod's VM cannot grow (no memory or
    /// CPU hotplug), so a pod that still fits its VM is accepted — its containers' own limits
    /// come through UpdateContainerResources — and one that outgrows it is refused.
    pub async fn update_pod_resources(&self, id: &str, demand: PodDemand) -> Result<()> {
        let rec = self.sandbox(id)?;
        let handler = self.handler(&rec.runtime_handler)?;
        if handler.on_host() {
            // No VM: the pod's containers' own limits are all there is.
            return Ok(());
        }
        let vm = rec.vm_size.unwrap_or(VmSize {
            vcpus: self.config.vm.vcpus,
            memory_mib: self.config.vm.memory_mib,
        });
        let wanted = handler.vm_size(&PodSpec { demand, ..Default::default() });
        let grows_cpu = demand.cpu_millis > 0 && wanted.vcpus > vm.vcpus;
        let grows_memory = demand.memory_bytes > 0 && wanted.memory_mib > vm.memory_mib;
        if grows_cpu || grows_memory {
            return Err(SandboxError::PodOutgrowsVm {
                vcpus: wanted.vcpus,
                memory_mib: wanted.memory_mib,
                vm_vcpus: vm.vcpus,
                vm_mib: vm.memory_mib,
            });
        }
        Ok(())
    }

    /// Handler `name`, or an error naming the configured ones.
    fn handler(&self, name: &str) -> Result<Handler> {
        Handler::resolve(&self.config, name).ok_or_else(|| SandboxError::UnknownHandler {
            name: name.to_string(),
            known: Handler::names(&self.config)
                .iter()
                .map(
                    |n| {
                        if n.is_empty() {
                            "\"\" (the default)".to_string()
                        } else {
                            format!("{n:?}")
                        }
                    },
                )
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    async fn boot_sandbox(
        self: &Arc<Self>,
        id: &str,
        pod: &PodSpec,
        handler: &Handler,
        size: VmSize,
    ) -> Result<()> {
        let mut phases = metrics::global().phases();
        let rec = self.sandbox(id)?;
        let resources = self.resources(&rec);
        resources.create()?;
        // A host pod joins its CNI namespace itself (no tap); a hostNetwork one has none.
        let wants_network = !(handler.on_host() && pod.namespaces.network == NamespaceMode::Node);
        let network_record =
            if wants_network { self.connect_network(id, pod).await? } else { None };
        let network = match &network_record {
            Some(record) if !handler.on_host() => Some(self.networks.attach(record).await?),
            _ => None,
        };
        phases.lap(PodStartPhase::Network);
        let mut net_devices = resources.net_devices();
        net_devices.extend(network.as_ref().map(|n| n.net_device.clone()));
        let hypervisor = self.hypervisor_for(handler)?;
        // Held until the agent answered (see `boot_slots`); never closed, so never an error.
        let _booting = self.boot_slots.acquire().await.ok();
        let prepared = hypervisor.prepare(id).await?;
        let spec = VmSpec {
            sandbox_id: id.to_string(),
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            kernel: handler.kernel.clone(),
            initrd: handler.initrd.clone(),
            extra_kernel_args: handler.kernel_args.clone(),
            console_log: self.console_log_path(id),
            console_log_max_bytes: self.config.vm.console_log_max_bytes(),
            shared_dirs: resources.shared_dirs(
                &pod.user_namespace
                    .as_ref()
                    .map(UserNamespace::share_translation)
                    .unwrap_or_default(),
            ),
            block_devices: resources.block_devices(),
            net_devices,
            netns: network_record.as_ref().map(|n| n.netns.clone()),
            host_namespaces: HostNamespaces {
                network: pod.namespaces.network == NamespaceMode::Node,
                ipc: pod.namespaces.ipc == NamespaceMode::Node,
            },
        };
        let builds = PendingBuilds { templates: &self.templates, planned: Default::default() };
        let start =
            GuestStart { id, handler, hypervisor: &hypervisor, spec: &spec, builds: &builds };
        let plan = self.start_plan(&start);
        let template = self.start_guest(&start, prepared, plan, &mut phases).await?;
        let agent = self.agent(id)?;
        phases.lap(PodStartPhase::AgentReady);
        drop(_booting);
        for inputs in builds.take() {
            self.spawn_template_build(Arc::clone(&hypervisor), inputs);
        }
        agent
            .create_sandbox(SandboxSetup {
                sandbox_id: id.to_string(),
                hostname: pod.hostname.clone(),
                dns_servers: pod.dns.servers.clone(),
                dns_searches: pod.dns.searches.clone(),
                dns_options: pod.dns.options.clone(),
                sysctls: pod.sysctls.clone(),
                shares: resources.guest_shares(),
                host_time_unix_nanos: now_nanos(),
                // POD mode: containers share a PID namespace of the pod's own (not the VM's,
                // which holds the agent); NODE mode uses the VM's.
                pod_pid_namespace: pod.namespaces.pid == NamespaceMode::Pod,
                pod_uid_mappings: agent_ranges(pod.user_namespace.as_ref().map(|u| &u.uids)),
                pod_gid_mappings: agent_ranges(pod.user_namespace.as_ref().map(|u| &u.gids)),
                entropy: host_entropy(),
                mac_changes: template
                    .map(|t| {
                        t.macs
                            .into_iter()
                            .zip(spec.net_devices.iter().map(|n| n.mac.clone()))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .await?;
        // A host pod's interfaces are CNI's as they are: it gets only the hosts lines.
        let setup = match network {
            Some(network) => Some(network.guest),
            None => network_record.map(|_| crate::agent::NetworkSetup::default()),
        };
        if let Some(mut setup) = setup {
            // As CRI-O writes it: the pod's own addresses resolve to its hostname.
            setup.hosts = self
                .sandbox(id)?
                .pod_ips()
                .into_iter()
                .map(|ip| (ip, vec![pod.hostname.clone()]))
                .filter(|(_, names)| !names[0].is_empty())
                .collect();
            agent.setup_network(setup).await?;
        }
        phases.lap(PodStartPhase::SandboxSetup);
        Ok(())
    }

    /// How a pod starts. A cold boot's reason is logged once per handler and reason; the
    /// template it asks for is built in the background once the pod's guest answered
    /// ([`PendingBuilds`]), so this pod does not wait for it (the build is one more boot, in
    /// a boot slot of its own).
    fn start_plan(&self, start: &GuestStart<'_>) -> StartPlan {
        let (handler, hypervisor, spec) = (start.handler, start.hypervisor, start.spec);
        if !handler.templates || self.config.vm.max_templates == 0 {
            return StartPlan::Cold { reason: TEMPLATES_OFF.into(), build: None };
        }
        let plan = match hypervisor.template_refusal(spec) {
            Some(reason) => StartPlan::Cold { reason, build: None },
            None => match self.templates.inputs(handler, hypervisor.name(), spec) {
                Ok(inputs) => self.templates.plan(&inputs),
                Err(e) => StartPlan::Cold { reason: e.to_string(), build: None },
            },
        };
        if let StartPlan::Cold { reason, build } = &plan {
            if self.templates.first_time(&handler.name, reason) {
                info!(handler = %handler.name, %reason, "pods cold-boot: no VM template");
            }
            if let Some(inputs) = build {
                lock(&start.builds.planned).push(inputs.clone());
            }
        }
        plan
    }

    /// Builds the template of `inputs` (whose build [`templates::Templates::plan`] handed out).
    fn spawn_template_build(
        self: &Arc<Self>,
        hypervisor: Arc<dyn crate::hypervisor::Hypervisor>,
        inputs: templates::TemplateInputs,
    ) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let key = inputs.key();
            let mut turn = this.templates.adopt_build(&key);
            // A template build is one more boot, and only a faster start for later pods: it
            // waits until no guest is booting (the semaphore is fair, so pods arriving meanwhile
            // queue behind it only for that wait), then boots in one slot. Booting beside the
            // pod that asked for it slowed that pod and, under nested emulation, made guests
            // die mid-boot. Never closed, so never an error.
            drop(this.boot_slots.acquire_many(boot_slots() as u32).await.ok());
            let _booting = this.boot_slots.acquire().await.ok();
            let timeout = Duration::from_secs(this.config.vm.boot_timeout_seconds);
            let max_log = this.config.vm.console_log_max_bytes();
            if let Err(e) =
                this.templates.build(&mut turn, &*hypervisor, &inputs, timeout, max_log).await
            {
                warn!(template = %key, handler = %inputs.handler, error = %e, "building the VM template failed; its pods cold-boot");
            }
        });
    }

    /// Starts the pod's VM as `plan` says and waits until its agent answers; returns the
    /// template it came from. A restore that fails, or whose agent does not answer within
    /// [`restored_agent_wait`], falls back to a cold boot (logged, naming the template) and the
    /// template is rebuilt.
    async fn start_guest(
        self: &Arc<Self>,
        start: &GuestStart<'_>,
        prepared: crate::hypervisor::PreparedVm,
        plan: StartPlan,
        phases: &mut metrics::PhaseTimer<'_>,
    ) -> Result<Option<templates::Template>> {
        let (vm, template, record) = match self.start_vm(start, &prepared, plan).await {
            Ok(started) => started,
            Err(e) => {
                let _ = start.hypervisor.discard(prepared).await;
                return Err(e.into());
            }
        };
        self.record_start(start.id, &vm, record).await?;
        phases.lap(PodStartPhase::VmStart);
        let boot_timeout = Duration::from_secs(self.config.vm.boot_timeout_seconds);
        let Some(template) = template else {
            self.wait_booted_agent(start, prepared, &vm, boot_timeout).await?;
            return Ok(None);
        };
        // A restored guest's agent serves already and announced itself to the template's
        // host long ago: the host dials it fresh (no connection crossed the snapshot).
        drop(prepared);
        let wait = restored_agent_wait(boot_timeout);
        match self.wait_restored_agent(start, &vm, wait).await {
            Ok(()) => Ok(Some(template)),
            Err(why) => {
                let reason = format!(
                    "the agent restored from template {} did not answer ({why}; waited at \
                     most {} s): the pod cold-booted and the template is rebuilt",
                    template.key,
                    wait.as_secs()
                );
                self.cold_boot_after_silent_restore(start, &vm, &template.key, reason).await?;
                Ok(None)
            }
        }
    }

    /// A restored VM whose agent never answered: it is stopped and cleaned up (its run
    /// directory, and with it the VMM's jail uid), the template discarded so that it is
    /// rebuilt, and the pod cold-boots in a fresh run directory with the same devices (its
    /// tap is the pod's and stays), its record saying why.
    async fn cold_boot_after_silent_restore(
        self: &Arc<Self>,
        start: &GuestStart<'_>,
        restored: &VmHandle,
        template: &str,
        reason: String,
    ) -> Result<()> {
        warn!(sandbox = %start.id, template, %reason, "a pod restored from a VM template did not answer: it cold-boots and the template is rebuilt");
        self.forget_agent(start.id);
        // A VM that does not stop stays recorded: the failed start's teardown retries.
        start.hypervisor.stop(restored, VM_STOP_GRACE).await?;
        start.hypervisor.cleanup(restored).await?;
        self.update_sandbox(start.id, |r| r.vm = None).await?;
        self.templates.discard(template);
        // Plans the rebuild.
        let _ = self.start_plan(start);
        let prepared = start.hypervisor.prepare(start.id).await?;
        let vm = match start.hypervisor.start(&prepared, start.spec).await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = start.hypervisor.discard(prepared).await;
                return Err(e.into());
            }
        };
        let record = StartRecord { path: "cold".into(), reason, template: String::new() };
        self.record_start(start.id, &vm, record).await?;
        let boot_timeout = Duration::from_secs(self.config.vm.boot_timeout_seconds);
        self.wait_booted_agent(start, prepared, &vm, boot_timeout).await
    }

    /// Records the pod's VM and how it started.
    async fn record_start(&self, id: &str, vm: &VmHandle, start: StartRecord) -> Result<()> {
        self.update_sandbox(id, |r| {
            r.vm = Some(vm.clone());
            r.start = Some(start);
        })
        .await?;
        Ok(())
    }

    /// Waits for a booting guest's ready announcement, then for its agent's first answer.
    async fn wait_booted_agent(
        &self,
        start: &GuestStart<'_>,
        prepared: crate::hypervisor::PreparedVm,
        vm: &VmHandle,
        timeout: Duration,
    ) -> Result<()> {
        let booting = std::time::Instant::now();
        if let Err(e) = start.hypervisor.wait_agent_ready(prepared, vm, timeout).await {
            return Err(self.boot_failed(start.id, &e.to_string(), booting.elapsed(), false));
        }
        if let Err(e) = self.agent(start.id)?.status().await {
            return Err(self.boot_failed(start.id, &e.to_string(), booting.elapsed(), true));
        }
        Ok(())
    }

    /// Starts the pod's VM as `plan` says; a restore that fails falls back to a cold boot
    /// (logged, naming the template) and the template is rebuilt.
    async fn start_vm(
        self: &Arc<Self>,
        start: &GuestStart<'_>,
        prepared: &crate::hypervisor::PreparedVm,
        plan: StartPlan,
    ) -> std::result::Result<
        (VmHandle, Option<templates::Template>, StartRecord),
        crate::hypervisor::HypervisorError,
    > {
        let (id, hypervisor, spec) = (start.id, start.hypervisor, start.spec);
        let reason = match plan {
            StartPlan::Restore { template, lease } => {
                let restored = hypervisor.restore(prepared, spec, &template.snapshot).await;
                // The VMM holds the template's files once its restore returned.
                drop(lease);
                match restored {
                    Ok(vm) => {
                        let start = StartRecord {
                            path: "template".into(),
                            reason: String::new(),
                            template: template.key.clone(),
                        };
                        return Ok((vm, Some(template), start));
                    }
                    Err(e) => {
                        warn!(sandbox = %id, template = %template.key, error = %e, "starting from the VM template failed: this pod cold-boots and the template is rebuilt");
                        self.templates.discard(&template.key);
                        // Plans the rebuild.
                        let _ = self.start_plan(start);
                        format!("restoring template {} failed: {e}", template.key)
                    }
                }
            }
            StartPlan::Cold { reason, .. } => reason,
        };
        let vm = hypervisor.start(prepared, spec).await?;
        Ok((vm, None, StartRecord { path: "cold".into(), reason, template: String::new() }))
    }

    /// Waits until a restored guest's agent answers: it serves already, but its vsock device
    /// comes back from the transport reset first. The whole wait is bounded by `timeout`,
    /// also a call the guest accepts and never answers, and ends when the VM exits. Says why
    /// it gave up.
    async fn wait_restored_agent(
        &self,
        start: &GuestStart<'_>,
        vm: &VmHandle,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let exited = start.hypervisor.exited(vm);
        let agent = self.agent(start.id).map_err(|e| e.to_string())?;
        let mut last_error = None;
        let answered = async {
            loop {
                match agent.status().await {
                    Ok(_) => return,
                    Err(e) => last_error = Some(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            answered = tokio::time::timeout(timeout, answered) => match answered {
                Ok(()) => Ok(()),
                Err(_) => Err(last_error.unwrap_or_else(|| "its first call never returned".into())),
            },
            () = exited => Err("the restored VM exited".into()),
        }
    }

    /// Attaches the pod's namespace to the CNI network (unless networking is off); a VM's tap
    /// is wired into it afterwards. What DEL needs is persisted before anything is created.
    async fn connect_network(&self, id: &str, pod: &PodSpec) -> Result<Option<NetworkRecord>> {
        if !self.networks.enabled() {
            return Ok(None);
        }
        let request = NetworkRequest {
            sandbox_id: id.to_string(),
            pod_namespace: pod.metadata.namespace.clone(),
            pod_name: pod.metadata.name.clone(),
            pod_uid: pod.metadata.uid.clone(),
            port_mappings: pod.port_mappings.clone(),
            annotations: pod.annotations.clone(),
        };
        let plan = self.networks.plan(&request)?;
        self.update_sandbox(id, |r| r.network = Some(plan.clone())).await?;
        let result = self.networks.add(&plan).await?;
        let rec = self
            .update_sandbox(id, |r| {
                if let Some(n) = r.network.as_mut() {
                    n.result = Some(result);
                }
            })
            .await?;
        Ok(Some(rec.network.unwrap_or(plan)))
    }

    /// CNI CHECK of a re-attached pod, in the background: a network that changed under a
    /// running pod while the daemon was away is reported, not repaired.
    fn check_network(self: &Arc<Self>, rec: &SandboxRecord) {
        let Some(network) = rec.network.clone() else { return };
        let (this, id) = (Arc::clone(self), rec.id.clone());
        tokio::spawn(async move {
            match this.networks.check(&network).await {
                Ok(()) => tracing::debug!(sandbox = %id, "CNI CHECK passed"),
                Err(e) => {
                    warn!(sandbox = %id, error = %e, "the pod's network is not as CNI ADD left it")
                }
            }
        });
    }

    /// DEL (idempotent) and the namespace's removal; the record forgets the attachment once
    /// both succeeded.
    async fn detach_network(&self, id: &str) -> Result<()> {
        let Some(network) = self.sandbox(id)?.network else { return Ok(()) };
        self.networks.remove(&network).await?;
        self.update_sandbox(id, |r| r.network = None).await?;
        Ok(())
    }

    /// The backend a handler's pods boot on.
    fn hypervisor_for(&self, handler: &Handler) -> Result<Arc<dyn crate::hypervisor::Hypervisor>> {
        match &handler.backend {
            Some(name) => Ok(self.hypervisors.get(name)?),
            None => Ok(self.hypervisors.default_backend()),
        }
    }

    /// A boot failure: what was slow (the kernel, the agent's start, or its answer), after how
    /// long, how loaded the host was, and the end of the guest console (removed with the
    /// failed sandbox).
    fn boot_failed(
        &self,
        id: &str,
        reason: &str,
        waited: Duration,
        announced: bool,
    ) -> SandboxError {
        let console = self.console_log_path(id);
        let stage = if announced {
            "the agent announced itself but did not answer its first call"
        } else {
            boot_stage(&console)
        };
        let tail = console_tail(&console);
        SandboxError::Boot {
            sandbox: id.to_string(),
            reason: format!(
                "{reason} ({stage}; after {:.1} s, host {}); guest console ends with:\n{tail}",
                waited.as_secs_f64(),
                host_load()
            ),
        }
    }

    /// Stops the VM (if any) and removes its run directory and shares. Leaves records alone.
    pub(super) async fn teardown_vm(&self, id: &str) -> Result<()> {
        self.forget_agent(id);
        let Some(rec) = lock(&self.state).sandboxes.get(id).cloned() else { return Ok(()) };
        if let Some(vm) = &rec.vm {
            let hypervisor = self.hypervisor_of(vm)?;
            hypervisor.stop(vm, VM_STOP_GRACE).await?;
            hypervisor.cleanup(vm).await?;
            self.test_hold("teardown:vm-stopped").await;
        } else {
            // A start the daemon did not live to record, on its handler's backend.
            let handler = self.handler(&rec.runtime_handler).unwrap_or_else(|_| {
                Handler::resolve(&self.config, "").expect("the default handler always resolves")
            });
            self.hypervisor_for(&handler)?.reclaim_interrupted_start(id).await?;
        }
        self.resources(&rec).destroy()?;
        // After the VM: its tap holds the namespace until the VMM exits.
        self.detach_network(id).await?;
        Ok(())
    }

    /// StopPodSandbox: kills every container, then stops the VM. Idempotent.
    pub async fn stop_sandbox(&self, id: &str) -> Result<()> {
        let rec = match self.sandbox(id) {
            Ok(rec) => rec,
            Err(SandboxError::SandboxNotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let id = rec.id;
        let guard = self.sandbox_lock(&id);
        let _op = guard.lock().await;
        let containers: Vec<String> = self.containers_of(&id).into_iter().map(|c| c.id).collect();
        // All at once: a guest that does not answer costs one call deadline, not one per
        // container; the VM goes below either way.
        let stops = containers.iter().map(|cid| async move {
            if let Err(e) = self.stop_container(cid, 0).await {
                warn!(container = %cid, error = %e, "stopping container with its sandbox");
            }
        });
        futures::future::join_all(stops).await;
        // NotReady before the VM goes, so the VM watcher knows this exit is expected.
        let rec = self.update_sandbox(&id, |r| r.state = SandboxState::NotReady).await?;
        if rec.vm.is_some() {
            if let Ok(agent) = self.agent(&id) {
                // Best effort, and bounded: the VM is stopped below either way.
                let _ = agent.shutdown().await;
            }
        }
        self.teardown_vm(&id).await?;
        let now = now_nanos();
        for cid in &containers {
            let _ = self
                .update_container(cid, |c| {
                    if c.state != ContainerState::Exited {
                        c.state = ContainerState::Exited;
                        c.finished_at = now;
                        if c.exit_code == 0 {
                            c.exit_code = 255;
                        }
                        c.reason = "PodSandboxStopped".into();
                    }
                })
                .await;
        }
        self.update_sandbox(&id, |r| r.vm = None).await?;
        info!(sandbox = %id, "pod sandbox stopped");
        Ok(())
    }

    /// Test-only, and only in debug builds: when `<state>/test-hold` names `point`, the
    /// operation stops there (for ten minutes) after logging "test hold: <point>", so the crash
    /// test can kill the daemon at that exact point (tests/tests/crash.rs).
    async fn test_hold(&self, point: &str) {
        #[cfg(debug_assertions)]
        {
            let file = self.config.state.join("test-hold");
            if std::fs::read_to_string(file).is_ok_and(|p| p.trim() == point) {
                warn!(point, "test hold: {point}");
                tokio::time::sleep(Duration::from_secs(600)).await;
            }
        }
        #[cfg(not(debug_assertions))]
        let _ = point;
    }

    /// RemovePodSandbox: stops it if needed and removes every trace. Idempotent.
    pub async fn remove_sandbox(&self, id: &str) -> Result<()> {
        let rec = match self.sandbox(id) {
            Ok(rec) => rec,
            Err(SandboxError::SandboxNotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let id = rec.id;
        if rec.state == SandboxState::Ready || rec.vm.is_some() {
            self.stop_sandbox(&id).await?;
        }
        self.test_hold("remove-sandbox:stopped").await;
        let guard = self.sandbox_lock(&id);
        let _op = guard.lock().await;
        self.teardown_vm(&id).await?;
        let containers = self.containers_of(&id);
        let sandbox = {
            let mut st = lock(&self.state);
            for c in &containers {
                st.containers.remove(&c.id);
            }
            let sandbox = st.sandboxes.remove(&id);
            let removed = self.remove_record(&self.sandbox_record_dir(&id));
            drop(st);
            (sandbox, removed)
        };
        let (sandbox, removed) = sandbox;
        removed.done().await?;
        self.test_hold("remove-sandbox:records-removed").await;
        for c in &containers {
            lock(&self.log_writers).remove(&c.id);
            lock(&self.container_locks).remove(&c.id);
            self.cpu_samples.forget(&c.id);
            metrics::global().container_removed(&c.id);
            let last =
                events::LastRecords { sandbox: sandbox.clone(), containers: vec![c.clone()] };
            self.events.emit_deleted(&c.id, &id, last);
        }
        store::remove_path(&self.sandbox_state_dir(&id))?;
        lock(&self.sandbox_locks).remove(&id);
        self.cpu_samples.forget(&stats::pod_key(&id));
        self.events.emit_deleted(&id, &id, events::LastRecords { sandbox, containers });
        info!(sandbox = %id, "pod sandbox removed");
        Ok(())
    }

    /// Watches the VM; if it exits while the sandbox is Ready, the sandbox becomes NotReady
    /// and its containers Exited (the VM took them down).
    fn watch_vm(self: &Arc<Self>, id: &str) {
        let Some(vm) = lock(&self.state).sandboxes.get(id).and_then(|s| s.vm.clone()) else {
            return;
        };
        let exited = match self.hypervisor_of(&vm) {
            Ok(hypervisor) => hypervisor.exited(&vm),
            Err(e) => {
                warn!(sandbox = %id, error = %e, "cannot watch the sandbox VM");
                return;
            }
        };
        let this = Arc::clone(self);
        let id = id.to_string();
        tokio::spawn(async move {
            exited.await;
            let still_ours = lock(&this.state)
                .sandboxes
                .get(&id)
                .is_some_and(|s| s.state == SandboxState::Ready && s.vm.as_ref() == Some(&vm));
            if !still_ours {
                return;
            }
            warn!(sandbox = %id, "the sandbox VM exited unexpectedly");
            this.forget_agent(&id);
            this.mark_containers_exited(&id, "the pod's VM exited").await;
            let _ = this.update_sandbox(&id, |r| r.state = SandboxState::NotReady).await;
        });
    }

    /// Every container of the sandbox that had not exited did when its VM went.
    async fn mark_containers_exited(&self, sandbox_id: &str, message: &str) {
        let now = now_nanos();
        for c in self.containers_of(sandbox_id) {
            if c.state == ContainerState::Exited {
                continue;
            }
            let _ = self
                .update_container(&c.id, |c| {
                    c.state = ContainerState::Exited;
                    c.finished_at = now;
                    c.exit_code = 255;
                    c.reason = "VMExited".into();
                    c.message = message.into();
                })
                .await;
        }
    }

    /// Loads the persisted records after a daemon (re)start and re-attaches to running VMs.
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        self.load_records();
        self.undo_interrupted_starts().await;
        self.sweep_unowned().await;
        self.templates.sweep();
        for sb in self.list_sandboxes() {
            let backend = sb.vm.as_ref().map(|vm| (vm, self.hypervisor_of(vm)));
            let alive = match &backend {
                Some((vm, Ok(hypervisor))) => hypervisor.is_running(vm),
                Some((vm, Err(e))) => {
                    warn!(sandbox = %sb.id, backend = %vm.backend, error = %e, "the pod's hypervisor backend is unavailable");
                    false
                }
                None => false,
            };
            if sb.state == SandboxState::Ready && alive {
                info!(sandbox = %sb.id, "re-attached to running pod sandbox");
                self.watch_vm(&sb.id);
                self.check_network(&sb);
                for c in self.containers_of(&sb.id) {
                    if c.state == ContainerState::Running {
                        self.follow_container(&c);
                    }
                }
            } else if sb.state == SandboxState::Ready || sb.vm.is_some() {
                warn!(sandbox = %sb.id, "pod sandbox VM is gone; marking it not ready");
                self.mark_containers_exited(&sb.id, "the pod's VM exited").await;
                if let Some(vm) = &sb.vm {
                    if let Err(e) = self.stop_leftover_vm(&sb.id, vm).await {
                        // Keep the VM recorded: StopPodSandbox retries, nothing is orphaned.
                        warn!(sandbox = %sb.id, error = %e, "stopping what is left of the pod's VM; keeping it recorded");
                        self.update_sandbox(&sb.id, |r| r.state = SandboxState::NotReady).await?;
                        continue;
                    }
                }
                let _ = self.resources(&sb).destroy();
                self.update_sandbox(&sb.id, |r| {
                    r.state = SandboxState::NotReady;
                    r.vm = None;
                })
                .await?;
            }
        }
        Ok(())
    }

    /// Stops what may be left of a VM whose VMM is gone (its helpers), through its backend.
    async fn stop_leftover_vm(&self, id: &str, vm: &VmHandle) -> Result<()> {
        match self.hypervisor_of(vm) {
            Ok(hypervisor) => {
                hypervisor.stop(vm, Duration::from_secs(1)).await?;
                let _ = hypervisor.cleanup(vm).await;
            }
            Err(_) => {
                // Without the backend, its recorded processes can still be stopped.
                crate::hypervisor::terminate_processes(&vm.processes, Duration::from_secs(1)).await;
                warn!(sandbox = %id, run_dir = %vm.run_dir.display(), "left the VM's run directory");
            }
        }
        Ok(())
    }

    /// Reads every record under `--root` (any schema) into memory.
    fn load_records(&self) {
        let dir = self.config.root.join("sandboxes");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        for entry in entries.flatten() {
            if !entry.path().is_dir() || store::is_temporary(&entry.path()) {
                continue;
            }
            let sandbox_path = entry.path().join("sandbox.json");
            let rec = match load_sandbox(&sandbox_path) {
                Ok(rec) => rec,
                Err(e) => {
                    warn!(path = %sandbox_path.display(), error = %e, "skipping unreadable sandbox record");
                    continue;
                }
            };
            let mut containers = Vec::new();
            for c in
                std::fs::read_dir(entry.path().join("containers")).into_iter().flatten().flatten()
            {
                // Temporary files of an interrupted write are not records.
                if store::is_temporary(&c.path())
                    || c.path().extension().is_none_or(|e| e != "json")
                {
                    continue;
                }
                match load_container(&c.path()) {
                    Ok(c) => containers.push(c),
                    Err(e) => {
                        warn!(path = %c.path().display(), error = %e, "skipping unreadable container record")
                    }
                }
            }
            let mut st = lock(&self.state);
            st.sandboxes.insert(rec.id.clone(), rec);
            for c in containers {
                st.containers.insert(c.id.clone(), c);
            }
        }
    }
}

/// How long a restored guest's agent may take to answer before the pod cold-boots instead
/// (capped by `[vm] boot_timeout_seconds`). A restored agent serves already: it answers as
/// soon as its vsock device is back from the transport reset, which took well under a second
/// of the 3.5–10 s restores measured under nested emulation. One silent for 30 s is not
/// coming (a guest wedged by the snapshot); a cold boot then costs the pod one boot more,
/// where waiting the whole boot timeout would cost it as much and fail it.
const RESTORED_AGENT_WAIT: Duration = Duration::from_secs(30);

/// The restored agent's wait for a boot timeout of `boot_timeout`.
fn restored_agent_wait(boot_timeout: Duration) -> Duration {
    boot_timeout.min(RESTORED_AGENT_WAIT)
}

/// What a pod's VM start needs, passed through the start path's steps.
struct GuestStart<'a> {
    id: &'a str,
    handler: &'a Handler,
    hypervisor: &'a Arc<dyn crate::hypervisor::Hypervisor>,
    spec: &'a VmSpec,
    builds: &'a PendingBuilds<'a>,
}

/// The template builds a pod's start planned, spawned once its guest answered: a VM that
/// cannot boot as the pod will not boot as its template either, and a build is one more
/// boot (where KVM cannot boot Linux, a guest that dies). Dropped unspawned (the pod's start
/// failed), each key's build is given back for a later pod to claim.
struct PendingBuilds<'a> {
    templates: &'a templates::Templates,
    planned: std::sync::Mutex<Vec<templates::TemplateInputs>>,
}

impl PendingBuilds<'_> {
    fn take(&self) -> Vec<templates::TemplateInputs> {
        std::mem::take(&mut *lock(&self.planned))
    }
}

impl Drop for PendingBuilds<'_> {
    fn drop(&mut self) {
        for inputs in self.take() {
            drop(self.templates.adopt_build(&inputs.key()));
        }
    }
}

/// Why a pod cold-boots when its handler has templates off.
const TEMPLATES_OFF: &str = "VM templates are off ([vm] templates, [runtimes.<handler>] \
    templates, or [vm] max_templates = 0)";

/// Fresh randomness for the guest to reseed from: every pod its own.
fn host_entropy() -> Vec<u8> {
    // uuid's v4 ids come from the OS's CSPRNG (getrandom).
    (0..4).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).collect()
}

/// The record of a pod being started.
/// A user namespace map as the agent boundary speaks it.
fn agent_ranges(maps: Option<&Vec<IdMapping>>) -> Vec<crate::agent::IdRange> {
    maps.into_iter()
        .flatten()
        .map(|m| crate::agent::IdRange {
            container_id: m.container_id,
            host_id: m.host_id,
            length: m.length,
        })
        .collect()
}

fn new_record(id: &str, pod: &PodSpec) -> SandboxRecord {
    SandboxRecord {
        schema_version: SCHEMA_VERSION,
        id: id.to_string(),
        metadata: pod.metadata.clone(),
        labels: pod.labels.clone(),
        annotations: pod.annotations.clone(),
        log_directory: pod.log_directory.clone(),
        hostname: pod.hostname.clone(),
        runtime_handler: pod.runtime_handler.clone(),
        dns: pod.dns.clone(),
        namespaces: pod.namespaces,
        share_layout: ShareLayout::Split,
        created_at: now_nanos(),
        state: SandboxState::NotReady,
        vm: None,
        network: None,
        vm_size: None,
        creating: true,
        user_namespace: pod.user_namespace.clone(),
        start: None,
    }
}

/// The line the guest kernel prints when it hands over to the agent (`/init`; not with
/// `quiet`), and the agent's own line once it listens.
const KERNEL_RAN_INIT: &str = "Run /init as init process";
const AGENT_SERVING: &str = "podvisor-agent serving on vsock";

/// How far a guest that did not announce its agent got, from its console: nothing printed
/// (the VMM never ran it), the kernel still booting, or the agent started and silent.
fn boot_stage(console: &std::path::Path) -> &'static str {
    use std::io::Read;
    let mut head = Vec::new();
    let read = std::fs::File::open(console)
        .and_then(|f| f.take(CONSOLE_HEAD_BYTES).read_to_end(&mut head));
    if read.is_err() || head.is_empty() {
        "the guest printed nothing: its kernel never ran (is the host overloaded?)"
    } else {
        let text = String::from_utf8_lossy(&head);
        if text.contains(AGENT_SERVING) {
            "the agent serves but its announcement never reached the host"
        } else if text.contains(KERNEL_RAN_INIT) {
            "the guest kernel started the agent, which never announced itself"
        } else {
            "the guest kernel was still booting and never started the agent (is the host overloaded?)"
        }
    }
}

/// The host's 1-minute load average against its CPUs, for boot errors.
fn host_load() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("load {} on {cpus} CPUs", load.split_whitespace().next().unwrap_or("?"))
}

/// The last [`CONSOLE_TAIL_LINES`] lines of the console log, from its last
/// [`CONSOLE_TAIL_BYTES`] only; bytes that are not UTF-8 (a guest prints what it likes) are
/// replaced, not a reason to show nothing.
fn console_tail(path: &std::path::Path) -> String {
    let tail = podvisor_vmm::console::read_tail(path, CONSOLE_TAIL_BYTES).unwrap_or_default();
    let text = String::from_utf8_lossy(&tail);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(CONSOLE_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A boot failure quotes the console's last lines without reading a large log whole, and
    /// garbage the guest printed earlier does not hide them.
    #[test]
    fn the_console_tail_comes_from_the_end_of_a_large_log() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(b"\xff\xfe early garbage\n").unwrap();
        for i in 0..200_000 {
            writeln!(f, "boot line {i}").unwrap();
        }
        f.write_all(b"Kernel panic - not syncing: \xff\n").unwrap();
        drop(f);
        let tail = console_tail(&path);
        let lines: Vec<&str> = tail.lines().collect();
        assert_eq!(lines.len(), CONSOLE_TAIL_LINES);
        assert_eq!(lines[0], "boot line 199986");
        assert!(lines[CONSOLE_TAIL_LINES - 1].starts_with("Kernel panic - not syncing: "));
        assert_eq!(console_tail(&dir.path().join("missing")), "");
    }

    /// A boot that timed out says how far the guest got.
    #[test]
    fn the_boot_stage_comes_from_the_console() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert!(boot_stage(&path).contains("printed nothing"));
        std::fs::write(&path, "[    0.000000] Linux version 6.1\n").unwrap();
        assert!(boot_stage(&path).contains("still booting"));
        std::fs::write(&path, format!("[    1.2] {KERNEL_RAN_INIT}\nagent up\n")).unwrap();
        assert!(boot_stage(&path).contains("started the agent"));
        std::fs::write(&path, format!("{KERNEL_RAN_INIT}\n{AGENT_SERVING} port=1024\n")).unwrap();
        assert!(boot_stage(&path).contains("never reached the host"));
        assert!(host_load().contains("CPUs"));
    }
}
