//! Starting a VM's host processes (the VMM and its vhost-user helpers), shared by both
//! backends: each runs in its own process group with its log in the run directory, an early
//! exit is reported with that log's path, and a start that fails stops what it had started.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::{
    process_start_time, terminate_processes, HypervisorError, Result, SharedDir, VmConfig,
    VmProcess,
};

/// The hybrid-vsock socket every backend creates in the VM's run directory.
pub fn vsock_uds(run_dir: &Path) -> PathBuf {
    run_dir.join("vsock.sock")
}

/// The vhost-user socket of the virtiofsd serving `tag`.
pub fn virtiofs_socket(run_dir: &Path, tag: &str) -> PathBuf {
    run_dir.join(format!("virtiofs-{tag}.sock"))
}

/// virtiofsd's arguments for one shared directory (no `--tag`: QEMU 7.2 warns about it).
///
/// virtiofsd stays root, as Kata runs it: it serves files of every owner in the image and the
/// volumes (as their owners: it switches fsuid/fsgid and needs CAP_CHOWN, CAP_DAC_OVERRIDE,
/// CAP_FOWNER, CAP_FSETID, CAP_SETUID/SETGID, CAP_MKNOD), which an unprivileged uid in a user
/// namespace could only do for the ids mapped into it, and the host's files keep their real
/// owners. Its own sandbox confines it instead: `--sandbox=namespace` (new mount, pid and
/// network namespaces, the shared directory as its root, so nothing else on the host is
/// reachable) and `--seccomp=kill` (its allowlist). Both are virtiofsd's defaults, spelled
/// out so that a changed default cannot loosen them.
pub fn virtiofsd_args(run_dir: &Path, dir: &SharedDir) -> Vec<OsString> {
    let mut socket = OsString::from("--socket-path=");
    socket.push(virtiofs_socket(run_dir, &dir.tag));
    let mut shared = OsString::from("--shared-dir=");
    shared.push(&dir.host_path);
    let mut args = vec![
        socket,
        shared,
        format!("--cache={}", dir.cache).into(),
        "--sandbox=namespace".into(),
        "--seccomp=kill".into(),
    ];
    if dir.read_only {
        args.push("--readonly".into());
    }
    for uid in &dir.ids.uids {
        args.push(format!("--translate-uid={}", uid.virtiofsd_arg()).into());
    }
    for gid in &dir.ids.gids {
        args.push(format!("--translate-gid={}", gid.virtiofsd_arg()).into());
    }
    args
}

/// Creates the run directory (private) and the console log (private: the guest's kernel and
/// init print what they like), and removes the sockets a previous run may have left, so that a
/// socket appearing means this run made it.
pub fn prepare_run_dir(config: &VmConfig, stale_sockets: &[PathBuf]) -> Result<()> {
    let run_dir_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| HypervisorError::RunDir { path, source }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&config.run_dir)
        .map_err(run_dir_err(&config.run_dir))?;
    if let Some(parent) = config.console_log.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(run_dir_err(parent))?;
    }
    create_private_file(&config.console_log).map_err(run_dir_err(&config.console_log))?;
    for path in stale_sockets {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(HypervisorError::RunDir { path: path.clone(), source: e })
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates `path` 0600, or makes an existing one 0600, before a VMM or QEMU appends to it
/// (they would create it 0644).
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// How long a helper's exit waits for the VMM's to show before it is reported itself.
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(200);

/// Where a starting VM lists the processes spawned so far, until its handle is recorded.
fn starting_record(run_dir: &Path) -> PathBuf {
    run_dir.join("starting.json")
}

/// Longest start record read (a VM has a handful of processes).
const STARTING_RECORD_MAX_BYTES: u64 = 64 * 1024;

/// The processes a start record lists, if the daemon wrote it. The run directory belongs to
/// the VM's uid, which may replace the file (not write into it: it is the daemon's, 0600) to
/// have the daemon signal processes of its choosing; so a record that is not this process's
/// own regular, singly linked file is ignored (the processes naming the run directory are
/// still found).
fn read_starting_record(path: &Path) -> Vec<VmProcess> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring a start record");
            return Vec::new();
        }
    };
    let trusted = file.metadata().is_ok_and(|m| {
        m.file_type().is_file() && m.uid() == nix::unistd::geteuid().as_raw() && m.nlink() == 1
    });
    if !trusted {
        tracing::warn!(path = %path.display(), "ignoring a start record the daemon did not write");
        return Vec::new();
    }
    let mut data = Vec::new();
    if file.take(STARTING_RECORD_MAX_BYTES).read_to_end(&mut data).is_err() {
        return Vec::new();
    }
    serde_json::from_slice(&data).unwrap_or_default()
}

/// Stops the processes an interrupted start listed in `run_dir` and removes the directory.
/// A process spawned just before the daemon died may be missing from the record, so processes
/// whose command line names the run directory (every VMM and helper is given it or a socket in
/// it) are stopped too.
pub async fn reclaim_interrupted_start(run_dir: &Path) -> Result<()> {
    let mut processes = read_starting_record(&starting_record(run_dir));
    for found in processes_naming(run_dir) {
        if !processes.iter().any(|p| p.pid == found.pid) {
            processes.push(found);
        }
    }
    if !processes.is_empty() {
        tracing::info!(run_dir = %run_dir.display(), ?processes, "stopping what an interrupted VM start left");
        // The recorded start times keep a reused pid from being signalled.
        terminate_processes(&processes, Duration::from_secs(1)).await;
    }
    super::remove_dir_if_exists(run_dir)
        .map_err(|source| HypervisorError::RunDir { path: run_dir.to_path_buf(), source })
}

/// Processes (not this one) with an argument that is `dir` or names a path inside it.
fn processes_naming(dir: &Path) -> Vec<VmProcess> {
    let exact = dir.as_os_str().as_encoded_bytes().to_vec();
    let mut prefix = exact.clone();
    prefix.push(b'/');
    let me = std::process::id() as i32;
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let names = cmdline
                .split(|b| *b == 0)
                .any(|arg| arg == exact || arg.windows(prefix.len()).any(|w| w == prefix));
            let start_time = process_start_time(pid)?;
            names.then(|| VmProcess { name: "leftover".into(), pid, start_time })
        })
        .collect()
}

/// A process spawned for a VM that is still starting.
struct Spawned {
    child: Child,
    process: VmProcess,
    log: PathBuf,
}

/// The processes of a VM being started: on failure they are all stopped again.
pub struct Starting {
    spawned: Vec<Spawned>,
    /// The VMM's name among the processes (`qemu`, `vmm`): it is listed first, and its exit
    /// stops the helpers.
    main: &'static str,
    /// The whole start-up's time budget, for error messages.
    timeout: Duration,
    /// Every spawn is listed here at once, so a daemon that dies mid-start leaves a list of
    /// what to stop ([`reclaim_interrupted_start`]).
    record: PathBuf,
}

impl Starting {
    pub fn new(main: &'static str, timeout: Duration, run_dir: &Path) -> Self {
        Self { spawned: Vec::new(), main, timeout, record: starting_record(run_dir) }
    }

    fn write_record(&self) {
        let processes: Vec<&VmProcess> = self.spawned.iter().map(|s| &s.process).collect();
        if let Err(e) = crate::store::write_json(&self.record, &processes) {
            tracing::warn!(error = %e, "recording a starting VM's processes");
        }
    }

    pub fn spawn(
        &mut self,
        name: &str,
        program: &OsStr,
        args: &[OsString],
        log: PathBuf,
    ) -> Result<()> {
        self.spawn_inheriting(name, program, args, log, &[])
    }

    /// [`Self::spawn`], the child inheriting `fds` (open in this process with FD_CLOEXEC, so
    /// no other child gets them) under the same numbers.
    pub fn spawn_inheriting(
        &mut self,
        name: &str,
        program: &OsStr,
        args: &[OsString],
        log: PathBuf,
        fds: &[std::os::fd::RawFd],
    ) -> Result<()> {
        let spawn_err = |source| HypervisorError::Spawn { what: name.to_string(), source };
        // The run directory is the VM's: a helper already running may have put a symlink
        // where this log goes (not followed: the open fails).
        let log_file: File = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&log)
            .map_err(spawn_err)?;
        let log_file2 = log_file.try_clone().map_err(spawn_err)?;
        let mut command = Command::new(program);
        let inherit = fds.to_vec();
        // SAFETY: the closure runs in the forked child before exec and only calls fcntl, which
        // is async-signal-safe; it allocates nothing (`inherit` was built before the fork).
        unsafe {
            command.pre_exec(move || {
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_file2)
            // Its own process group: signals aimed at the daemon's group spare the VM.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(spawn_err)?;
        let pid = child
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .ok_or_else(|| spawn_err(std::io::Error::other("the spawned process has no pid")))?;
        // The child cannot have been reaped yet (only we wait for it), so /proc/<pid> exists.
        let start_time = process_start_time(pid).ok_or_else(|| {
            spawn_err(std::io::Error::other(format!("cannot read /proc/{pid}/stat")))
        })?;
        tracing::debug!(name, pid, ?args, "spawned");
        self.spawned.push(Spawned {
            child,
            process: VmProcess { name: name.to_string(), pid, start_time },
            log,
        });
        self.write_record();
        Ok(())
    }

    /// Fails if any process has exited, naming its log. Helpers end when the VMM does (the
    /// console copier at the end of its pipe, virtiofsd when the VMM hangs up), possibly a
    /// moment before the VMM's own exit shows: a helper's exit is reported only if the VMM
    /// still runs a little later, so the error names the VMM's log when the VMM failed.
    pub async fn check_running(&mut self) -> Result<()> {
        let Some(exited) = self.first_exited() else { return Ok(()) };
        let main = self.main;
        let deadline = Instant::now() + HELPER_EXIT_GRACE;
        while self.spawned[exited].process.name != main && Instant::now() < deadline {
            if let Some(index) = self.exited_named(main) {
                return Err(self.early_exit(index));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let reported = self.exited_named(main).unwrap_or(exited);
        Err(self.early_exit(reported))
    }

    /// The first spawned process that has exited.
    fn first_exited(&mut self) -> Option<usize> {
        (0..self.spawned.len()).find(|&i| !matches!(self.spawned[i].child.try_wait(), Ok(None)))
    }

    /// The process named `name`, if it has exited.
    fn exited_named(&mut self, name: &str) -> Option<usize> {
        (0..self.spawned.len()).find(|&i| {
            self.spawned[i].process.name == name
                && !matches!(self.spawned[i].child.try_wait(), Ok(None))
        })
    }

    fn early_exit(&mut self, index: usize) -> HypervisorError {
        let s = &mut self.spawned[index];
        let status = match s.child.try_wait() {
            Ok(Some(status)) => status.to_string(),
            Ok(None) => "still running".into(),
            Err(e) => format!("unknown: {e}"),
        };
        HypervisorError::EarlyExit { what: s.process.name.clone(), status, log: s.log.clone() }
    }

    /// Waits until `path` exists, failing early if a process exits.
    pub async fn wait_for_path(
        &mut self,
        what: &str,
        path: &Path,
        deadline: Instant,
    ) -> Result<()> {
        loop {
            self.check_running().await?;
            if path.exists() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.timeout_error(what, path));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts one virtiofsd per shared directory (both backends use vhost-user-fs) and waits
    /// for each socket.
    pub async fn start_virtiofsds(
        &mut self,
        binary: &OsStr,
        config: &VmConfig,
        deadline: Instant,
    ) -> Result<()> {
        for dir in &config.shared_dirs {
            let name = format!("virtiofsd-{}", dir.tag);
            let log = config.run_dir.join(format!("{name}.log"));
            self.spawn(&name, binary, &virtiofsd_args(&config.run_dir, dir), log)?;
            self.wait_for_path(&name, &virtiofs_socket(&config.run_dir, &dir.tag), deadline)
                .await?;
        }
        Ok(())
    }

    /// The log file of the process named `name`.
    pub fn log_of(&self, name: &str) -> PathBuf {
        self.spawned
            .iter()
            .find(|s| s.process.name == name)
            .map(|s| s.log.clone())
            .unwrap_or_default()
    }

    pub fn timeout_error(&self, what: &str, path: &Path) -> HypervisorError {
        tracing::warn!(what, log = %self.log_of(what).display(), "start-up timed out");
        HypervisorError::SocketTimeout {
            what: what.to_string(),
            path: path.to_path_buf(),
            timeout: self.timeout,
        }
    }

    /// Stops what was started and reaps it.
    pub async fn abort(self) {
        let processes: Vec<VmProcess> = self.spawned.iter().map(|s| s.process.clone()).collect();
        terminate_processes(&processes, Duration::from_secs(1)).await;
        for mut s in self.spawned {
            let _ = tokio::time::timeout(Duration::from_secs(1), s.child.wait()).await;
        }
    }

    /// Hands the processes over, the VMM first. Background tasks reap them, and stop the
    /// helpers once the VMM has exited.
    /// The caller records the returned processes with the VM's handle.
    pub fn finish(mut self) -> Vec<VmProcess> {
        let _ = std::fs::remove_file(&self.record);
        let main_name = self.main;
        let main = self
            .spawned
            .iter()
            .position(|s| s.process.name == main_name)
            .map(|i| self.spawned.remove(i));
        let helpers: Vec<VmProcess> = self.spawned.iter().map(|s| s.process.clone()).collect();
        let mut processes: Vec<VmProcess> = main.iter().map(|s| s.process.clone()).collect();
        processes.extend(helpers.iter().cloned());
        for mut s in self.spawned {
            tokio::spawn(async move {
                let _ = s.child.wait().await;
            });
        }
        if let Some(mut main) = main {
            tokio::spawn(async move {
                let status = main.child.wait().await;
                tracing::info!(name = main_name, pid = main.process.pid, ?status, "VMM exited");
                terminate_processes(&helpers, Duration::from_secs(2)).await;
            });
        }
        processes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM uid owns its run directory and may swap the start record for one of its own,
    /// listing processes it wants the daemon to signal: only the daemon's own file counts.
    #[test]
    fn a_start_record_the_daemon_did_not_write_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("starting.json");
        let listed = vec![VmProcess { name: "vmm".into(), pid: 1, start_time: 7 }];
        crate::store::write_json(&record, &listed).unwrap();
        assert_eq!(read_starting_record(&record), listed);

        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::rename(&record, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &record).unwrap();
        assert!(read_starting_record(&record).is_empty(), "a symlink is followed");
        std::fs::remove_file(&record).unwrap();

        std::fs::hard_link(&elsewhere, &record).unwrap();
        assert!(read_starting_record(&record).is_empty(), "a second link is trusted");
        std::fs::remove_file(&record).unwrap();

        std::fs::copy(&elsewhere, &record).unwrap();
        if nix::unistd::geteuid().is_root() {
            std::os::unix::fs::chown(&record, Some(65534), Some(65534)).unwrap();
            assert!(read_starting_record(&record).is_empty(), "another uid's file is trusted");
        }
        assert!(read_starting_record(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn the_run_dir_and_the_console_log_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let config = VmConfig {
            sandbox_id: "sb".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: "/k".into(),
            initrd: "/i".into(),
            extra_kernel_args: String::new(),
            run_dir: dir.path().join("vms/sb"),
            console_log: dir.path().join("sandboxes/sb/console.log"),
            console_log_max_bytes: podvisor_vmm::console::DEFAULT_MAX_BYTES,
            shared_dirs: vec![],
            block_devices: vec![],
            net_devices: vec![],
        };
        prepare_run_dir(&config, &[]).unwrap();
        assert_eq!(mode(&config.run_dir), 0o700);
        assert_eq!(mode(config.console_log.parent().unwrap()), 0o700);
        assert_eq!(mode(&config.console_log), 0o600);
        // A console log an older daemon's VMM made 0644 is tightened.
        std::fs::set_permissions(&config.console_log, std::fs::Permissions::from_mode(0o644))
            .unwrap();
        prepare_run_dir(&config, &[]).unwrap();
        assert_eq!(mode(&config.console_log), 0o600);
    }

    /// What a VMM or helper prints (the guest's kernel arguments, paths, errors) is root's.
    #[tokio::test]
    async fn process_logs_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("helper.log");
        let mut starting = Starting::new("helper", Duration::from_secs(5), dir.path());
        starting.spawn("helper", OsStr::new("true"), &[], log.clone()).unwrap();
        let mode = std::fs::metadata(&log).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");
        starting.finish();
    }

    /// A log path a helper of the VM replaced with a symlink is not followed.
    #[tokio::test]
    async fn a_log_swapped_for_a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("root-file");
        std::fs::write(&target, "root's\n").unwrap();
        let log = dir.path().join("qemu.log");
        std::os::unix::fs::symlink(&target, &log).unwrap();
        let mut starting = Starting::new("helper", Duration::from_secs(5), dir.path());
        let spawned = starting.spawn("helper", OsStr::new("echo"), &["leaked".into()], log);
        assert!(spawned.is_err(), "spawned with its log through a symlink");
        starting.finish();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "root's\n");
    }

    /// A helper whose spawn the record missed is found by its arguments and stopped.
    #[tokio::test]
    async fn an_interrupted_start_is_reclaimed_with_processes_the_record_missed() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("vm");
        std::fs::create_dir_all(&run_dir).unwrap();
        let socket = run_dir.join("helper.sock");
        let mut orphan = std::process::Command::new("sh")
            .args(["-c", "sleep 30", &socket.display().to_string()])
            .spawn()
            .unwrap();
        // The console copier is given the run directory itself.
        let mut named = std::process::Command::new("sh")
            .args(["-c", "sleep 30", &run_dir.display().to_string()])
            .spawn()
            .unwrap();
        // A sibling's name starts like ours.
        let other = std::process::Command::new("sh")
            .args(["-c", "sleep 30", &dir.path().join("vm2").display().to_string()])
            .spawn()
            .unwrap();
        let mut want = vec![orphan.id() as i32, named.id() as i32];
        want.sort();
        // spawn() returns once the child is in execve, which sets the new command line only
        // a moment later: until then /proc shows none.
        let deadline = Instant::now() + Duration::from_secs(5);
        let found = loop {
            let mut found: Vec<i32> = processes_naming(&run_dir).iter().map(|p| p.pid).collect();
            found.sort();
            if found == want || Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(found, want);
        reclaim_interrupted_start(&run_dir).await.unwrap();
        assert!(orphan.wait().unwrap().code().is_none(), "the orphan was not signalled");
        assert!(named.wait().unwrap().code().is_none(), "the orphan was not signalled");
        assert!(!run_dir.exists());
        let mut other = other;
        assert!(other.try_wait().unwrap().is_none(), "an unrelated process was stopped");
        other.kill().unwrap();
        let _ = other.wait();
    }
}
