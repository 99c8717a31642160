//! Building and running one VM: KVM VM + memfd guest memory + kernel/initramfs + legacy and
//! virtio-mmio devices + vCPUs, then an event loop (event-manager) on the calling thread
//! until the VM exits. A VM restored from a snapshot is built the same way, on the
//! snapshot's memory file, and takes the saved state instead of loading a kernel.

use std::collections::HashMap;
use std::os::unix::thread::JoinHandleExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use seccompiler::BpfProgram;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{boot, cpuid, mptable, regs};
use crate::bus::{Bus, BusError};
use crate::config::VmmConfig;
use crate::console::CappedLog;
use crate::devices::{MmioTransport, VirtioDevice};
use crate::layout;
use crate::legacy::{SerialDevice, I8042};
use crate::memory::{self, GuestMemory};
use crate::snapshot::{
    self, kvm_state, Pausable, SnapshotError, SnapshotSource, SnapshotState, SnapshotSummary,
    Snapshottable,
};
use crate::vcpu::{self, Vcpu};
use crate::vstate::{ExitReason, RunState, VcpuControl, VmExit};

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("opening /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM lacks {0:?}, which the VMM needs")]
    MissingCap(Cap),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("KVM_CREATE_VCPU {id}: {source}")]
    CreateVcpu { id: u8, source: kvm_ioctls::Error },
    #[error("opening the console log {path}: {source}")]
    ConsoleLog { path: String, source: std::io::Error },
    #[error("creating an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM_IRQFD for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("placing a device on the bus: {0}")]
    Bus(#[from] BusError),
    #[error("no virtio-mmio window left for another device")]
    NoMmioWindow,
    #[error("creating the event loop: {0}")]
    EventManager(event_manager::Error),
    #[error("device {id}: {reason}")]
    Device { id: String, reason: String },
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("installing the VMM thread seccomp filter: {0}")]
    Seccomp(seccompiler::Error),
    #[error("the vCPUs did not {0} within 2 s")]
    VcpuTimeout(&'static str),
    #[error("the vCPUs were already started")]
    AlreadyStarted,
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// Subscribers run by the event loop (devices' host-side event handlers, the control socket).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Swaps the backing file of a drive (implemented by the virtio-blk device).
pub type DriveSwapper = Box<dyn Fn(&std::path::Path, bool) -> Result<(), String> + Send + Sync>;

/// What was loaded where, for logs and tests.
#[derive(Debug, Clone)]
pub struct BootSummary {
    pub entry: u64,
    pub pvh_entry: Option<u64>,
    pub kernel_end: u64,
    pub initrd: Option<boot::LoadedInitrd>,
    pub cmdline: String,
}

/// Run/pause/stop of the vCPU threads, usable from the event loop's subscribers.
pub struct RunControl {
    pub control: Arc<VcpuControl>,
    pub exit: Arc<VmExit>,
    pub vcpus: usize,
    threads: Mutex<Vec<libc::pthread_t>>,
    pub drives: Mutex<HashMap<String, DriveSwapper>>,
    pub memory_mib: u32,
    /// What a snapshot reads; set when the vCPUs start.
    snapshot: OnceLock<SnapshotSource>,
}

impl RunControl {
    fn kick(&self) {
        for &thread in self.threads.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            // SAFETY: the pthread_t values belong to vCPU threads that are joined only after
            // `threads` is emptied (see `Vmm::stop_vcpus`), so they are valid here; the signal
            // has a no-op handler installed before the threads started.
            unsafe { libc::pthread_kill(thread, vcpu::kick_signal()) };
        }
    }

    /// Asks the vCPUs for `state` and kicks them until `done` reports they all complied.
    fn transition(
        &self,
        state: RunState,
        what: &'static str,
        done: impl Fn() -> bool,
    ) -> Result<(), VmmError> {
        self.control.set_state(state);
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            self.kick();
            if done() {
                return Ok(());
            }
        }
        Err(VmmError::VcpuTimeout(what))
    }

    pub fn pause(&self) -> Result<(), VmmError> {
        if self.control.state() == RunState::Stopping {
            return Ok(());
        }
        self.transition(RunState::Paused, "pause", || {
            self.control.wait_quiesced(self.vcpus, Duration::from_millis(20))
        })
    }

    pub fn resume(&self) {
        if self.control.state() == RunState::Paused {
            self.control.set_state(RunState::Running);
        }
    }

    /// Writes a snapshot of the paused VM into `dir`.
    pub fn snapshot(&self, dir: &Path) -> Result<SnapshotSummary, SnapshotError> {
        let source = self.snapshot.get().ok_or(SnapshotError::NotStarted)?;
        match self.control.state() {
            RunState::Paused => source.write(dir),
            RunState::Running => Err(SnapshotError::NotPaused("running")),
            RunState::Stopping => Err(SnapshotError::NotPaused("stopping")),
        }
    }

    pub fn stop(&self) -> Result<(), VmmError> {
        self.transition(RunState::Stopping, "stop", || {
            self.control.wait_finished(self.vcpus, Duration::from_millis(20))
        })
    }
}

impl Pausable for RunControl {
    type Error = VmmError;

    fn pause(&self) -> Result<(), VmmError> {
        RunControl::pause(self)
    }

    fn resume(&self) -> Result<(), VmmError> {
        RunControl::resume(self);
        Ok(())
    }
}

/// Reads the VM's exit eventfd so the level-triggered loop does not spin; the loop itself
/// checks [`VmExit::reason`].
struct ExitSubscriber(Arc<VmExit>);

impl MutEventSubscriber for ExitSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A failure leaves the loop polling the reason on its timeout.
        let _ = ops.add(Events::new(self.0.eventfd(), EventSet::IN));
    }
}

/// One VM.
pub struct Vmm {
    kvm: Kvm,
    vm: Arc<VmFd>,
    mem: GuestMemory,
    pio: Bus,
    mmio: Bus,
    serial: Arc<Mutex<SerialDevice>>,
    /// The vCPU fds; each vCPU thread holds its own one locked while in KVM_RUN.
    vcpu_fds: Vec<Arc<Mutex<VcpuFd>>>,
    started: bool,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    threads: Vec<JoinHandle<()>>,
    run: Arc<RunControl>,
    events: EventManager<Subscriber>,
    next_mmio_index: u64,
    mmio_devices: Vec<(u64, u32)>,
    config: VmmConfig,
    pub boot: Option<BootSummary>,
}

impl Vmm {
    /// Creates the VM, its memory, the legacy devices and the vCPUs (not yet configured for
    /// boot: add virtio devices, then call [`Vmm::load`]).
    pub fn new(config: &VmmConfig) -> Result<Self, VmmError> {
        let mem = memory::create_guest_memory(config.memory_bytes())?;
        Self::with_memory(config, mem)
    }

    /// Creates the VM for a restore from the snapshot in `dir`: its memory is the snapshot's
    /// memory file mapped copy-on-write. Add the same virtio devices as the snapshotted VM
    /// had, then call [`Vmm::restore`] with the returned state.
    pub fn from_snapshot(
        config: &VmmConfig,
        dir: &Path,
    ) -> Result<(Self, SnapshotState), VmmError> {
        if config.fs.iter().any(|fs| fs.kind == crate::config::FsKind::VhostUser) {
            return Err(SnapshotError::VhostUserFs.into());
        }
        let state = snapshot::read_state(dir)?;
        let configured = config.memory_bytes();
        if state.memory_bytes != configured || state.vcpus.len() != usize::from(config.vcpus) {
            return Err(SnapshotError::Mismatch {
                snapshot: format!("{} vCPUs, {} MiB", state.vcpus.len(), state.memory_bytes >> 20),
                config: format!("{} vCPUs, {} MiB", config.vcpus, configured >> 20),
            }
            .into());
        }
        let mem = memory::map_snapshot_private(&dir.join(snapshot::MEMORY_FILE), configured)?;
        Ok((Self::with_memory(config, mem)?, state))
    }

    fn with_memory(config: &VmmConfig, mem: GuestMemory) -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        for cap in [Cap::Irqchip, Cap::Irqfd, Cap::Pit2, Cap::UserMemory, Cap::SetTssAddr] {
            if !kvm.check_extension(cap) {
                return Err(VmmError::MissingCap(cap));
            }
        }
        let vm = kvm.create_vm().map_err(VmmError::CreateVm)?;
        vm.set_tss_address(layout::KVM_TSS_START as usize).map_err(VmmError::SetTss)?;
        vm.create_irq_chip().map_err(VmmError::CreateIrqchip)?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        vm.create_pit2(pit).map_err(VmmError::CreatePit)?;

        memory::register_with_kvm(&vm, &mem)?;

        let exit = Arc::new(VmExit::new().map_err(VmmError::EventFd)?);
        let mut pio = Bus::new();
        // Capped: the guest decides how much it prints, the host's memory holds the log.
        let console = CappedLog::open(&config.console_log, config.console_log_max_bytes).map_err(
            |source| VmmError::ConsoleLog {
                path: config.console_log.display().to_string(),
                source,
            },
        )?;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(|source| VmmError::Irqfd { gsi: layout::SERIAL_IRQ, source })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, Box::new(console))));
        pio.insert(serial.clone(), layout::SERIAL_PORT_BASE, layout::SERIAL_PORT_SIZE)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            layout::I8042_PORT_BASE,
            layout::I8042_PORT_SIZE,
        )?;

        let mut vcpu_fds = Vec::new();
        for id in 0..config.vcpus {
            let fd = vm
                .create_vcpu(u64::from(id))
                .map_err(|source| VmmError::CreateVcpu { id, source })?;
            vcpu_fds.push(Arc::new(Mutex::new(fd)));
        }

        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(VmmError::EventManager)?;
        events.add_subscriber(Arc::new(Mutex::new(ExitSubscriber(exit.clone()))));
        let run = Arc::new(RunControl {
            control: Arc::new(VcpuControl::default()),
            exit,
            vcpus: vcpu_fds.len(),
            threads: Mutex::new(Vec::new()),
            drives: Mutex::new(HashMap::new()),
            memory_mib: config.memory_mib,
            snapshot: OnceLock::new(),
        });
        Ok(Self {
            kvm,
            vm: Arc::new(vm),
            mem,
            pio,
            mmio: Bus::new(),
            serial,
            vcpu_fds,
            started: false,
            transports: Vec::new(),
            threads: Vec::new(),
            run,
            events,
            next_mmio_index: 0,
            mmio_devices: Vec::new(),
            config: config.clone(),
            boot: None,
        })
    }

    pub fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The run control shared with the control socket.
    pub fn run_control(&self) -> Arc<RunControl> {
        self.run.clone()
    }

    /// A vCPU's fd (for state inspection while its thread does not run it).
    pub fn vcpu_fd(&self, id: usize) -> Option<MutexGuard<'_, VcpuFd>> {
        Some(lock(self.vcpu_fds.get(id)?))
    }

    /// Adds a subscriber to the event loop.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        self.events.add_subscriber(subscriber);
    }

    /// Puts `device` behind a virtio-mmio transport in the next window, wires its interrupt
    /// through an irqfd, and declares it on the kernel command line. Returns (address, GSI).
    pub fn add_virtio_device(
        &mut self,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<(u64, u32), VmmError> {
        let index = self.next_mmio_index;
        let addr = layout::mmio_device_addr(index).ok_or(VmmError::NoMmioWindow)?;
        let irq = layout::mmio_device_irq(index).ok_or(VmmError::NoMmioWindow)?;
        let irq_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(VmmError::EventFd)?;
        self.vm
            .register_irqfd(&irq_evt, irq)
            .map_err(|source| VmmError::Irqfd { gsi: irq, source })?;
        let transport = Arc::new(Mutex::new(MmioTransport::new(self.mem.clone(), irq_evt, device)));
        self.mmio.insert(transport.clone(), addr, layout::MMIO_DEVICE_SIZE)?;
        self.transports.push(transport);
        self.next_mmio_index += 1;
        self.mmio_devices.push((addr, irq));
        Ok((addr, irq))
    }

    /// Maps a plain [`crate::devices::BusDevice`] in the MMIO space (tests, debug devices).
    pub fn add_mmio_bus_device(
        &mut self,
        device: crate::bus::SharedDevice,
        addr: u64,
        len: u64,
    ) -> Result<(), VmmError> {
        Ok(self.mmio.insert(device, addr, len)?)
    }

    /// Registers a drive's backing-file swap for the control socket's `swap_drive`.
    pub fn add_drive_swapper(&mut self, id: &str, swap: DriveSwapper) {
        self.run.drives.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_string(), swap);
    }

    /// Loads kernel, initramfs, command line, zero page and MP table, and sets every vCPU's
    /// boot state (CPUID, registers, MSRs, LAPIC).
    pub fn load(&mut self) -> Result<&BootSummary, VmmError> {
        let kernel = boot::load_kernel(&self.mem, &self.config.kernel)?;
        let initrd = match &self.config.initrd {
            Some(path) => Some(boot::load_initrd(&self.mem, path, kernel.end)?),
            None => None,
        };
        let cmdline = boot::build_cmdline(&self.config.cmdline, &self.mmio_devices)
            .map_err(VmmError::Cmdline)?;
        let cmdline_len = boot::write_cmdline(&self.mem, &cmdline)?;
        let zero_page = boot::build_zero_page(cmdline_len, initrd, &boot::e820_map(&self.mem))?;
        boot::write_zero_page(&self.mem, &zero_page)?;
        mptable::setup(&self.mem, self.config.vcpus)?;

        let count = self.config.vcpus;
        for (id, fd) in self.vcpu_fds.iter().enumerate() {
            let fd = lock(fd);
            cpuid::configure_vcpu(&self.kvm, &fd, id as u8, count)?;
            regs::configure_vcpu(&fd, &self.mem, kernel.entry)?;
        }
        let cmdline =
            cmdline.as_cstring().map_err(VmmError::Cmdline)?.into_string().unwrap_or_default();
        Ok(self.boot.insert(BootSummary {
            entry: kernel.entry,
            pvh_entry: kernel.pvh_entry,
            kernel_end: kernel.end,
            initrd,
            cmdline,
        }))
    }

    /// Puts a snapshot's state (from [`Vmm::from_snapshot`]) into this VM, in place of
    /// [`Vmm::load`]: the in-kernel irqchip, PIT and clock, every vCPU, the serial port and
    /// each virtio transport (an active device is re-activated on its restored queues).
    pub fn restore(&mut self, state: &SnapshotState) -> Result<(), VmmError> {
        let virtio_types: Vec<u32> = self
            .transports
            .iter()
            .map(|t| lock(t).device().lock().map_or(0, |d| d.device_type()))
            .collect();
        state.check_matches(self.vcpu_fds.len(), self.config.memory_bytes(), &virtio_types)?;
        kvm_state::check_xsave_size(&self.kvm).map_err(SnapshotError::from)?;
        kvm_state::restore_vm(&self.vm, &state.vm).map_err(SnapshotError::from)?;
        for (fd, vcpu) in self.vcpu_fds.iter().zip(&state.vcpus) {
            kvm_state::restore_vcpu(&lock(fd), vcpu).map_err(SnapshotError::from)?;
        }
        lock(&self.serial).restore_state(&state.serial).map_err(SnapshotError::from)?;
        for (index, (transport, saved)) in self.transports.iter().zip(&state.virtio).enumerate() {
            lock(transport)
                .restore_state(saved)
                .map_err(|source| SnapshotError::Virtio { index, source })?;
        }
        Ok(())
    }

    /// Starts the vCPU threads. Each installs `vcpu_filter` first, the calling thread installs
    /// `vmm_filter`, and only then does any guest code run (the threads wait at a gate).
    pub fn start(
        &mut self,
        vcpu_filter: Option<BpfProgram>,
        vmm_filter: Option<BpfProgram>,
    ) -> Result<(), VmmError> {
        if self.started {
            return Err(VmmError::AlreadyStarted);
        }
        self.started = true;
        let msr_indices = kvm_state::msr_indices(&self.kvm).map_err(SnapshotError::from)?;
        // Set once: `started` guards against a second start.
        let _ = self.run.snapshot.set(SnapshotSource {
            vm: self.vm.clone(),
            vcpus: self.vcpu_fds.clone(),
            msr_indices,
            mem: self.mem.clone(),
            serial: self.serial.clone(),
            virtio: self.transports.clone(),
        });
        vcpu::register_kick_handler()?;
        let pio = Arc::new(std::mem::take(&mut self.pio));
        let mmio = Arc::new(std::mem::take(&mut self.mmio));
        let gate = Arc::new(vcpu::StartGate::default());
        for (id, fd) in self.vcpu_fds.iter().enumerate() {
            let vcpu = Vcpu {
                id: id as u8,
                fd: fd.clone(),
                pio: pio.clone(),
                mmio: mmio.clone(),
                exit: self.run.exit.clone(),
                control: self.run.control.clone(),
            };
            match vcpu.start(vcpu_filter.clone(), gate.clone()) {
                Ok(handle) => self.threads.push(handle),
                Err(e) => {
                    // The threads already started return without running the guest.
                    gate.open(false);
                    return Err(e.into());
                }
            }
        }
        *self.run.threads.lock().unwrap_or_else(|p| p.into_inner()) =
            self.threads.iter().map(|t| t.as_pthread_t()).collect();
        let installed = match &vmm_filter {
            Some(f) => seccompiler::apply_filter(f).map_err(VmmError::Seccomp),
            None => Ok(()),
        };
        gate.open(installed.is_ok());
        installed
    }

    /// Runs the event loop until the VM exits; then stops the vCPUs.
    pub fn run_until_exit(&mut self) -> ExitReason {
        let reason = loop {
            if let Some(reason) = self.run.exit.reason() {
                break reason;
            }
            if let Err(e) = self.events.run_with_timeout(200) {
                break ExitReason::Error(format!("event loop: {e}"));
            }
        };
        self.stop_vcpus();
        reason
    }

    /// Stops and joins the vCPU threads (bounded: a thread stuck in the kernel is left).
    pub fn stop_vcpus(&mut self) {
        let _ = self.run.stop();
        self.run.threads.lock().unwrap_or_else(|p| p.into_inner()).clear();
        for thread in self.threads.drain(..) {
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
