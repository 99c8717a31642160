//! The VMM as a process (`podvisor-vmm`, same code as `podvisor vmm`): seccomp filters on,
//! control socket, jail, exit codes. Needs /dev/kvm; skips with the reason otherwise.

mod common;

use common::{config, kvm_available, spawn};
use podvisor_vmm::control::Request;
use podvisor_vmm::guest_program::asm;
use podvisor_vmm::layout::SERIAL_PORT_BASE;

/// Prints `text` on COM1, then halts with interrupts off (stays "running", costs no CPU).
fn print_and_halt(text: &[u8]) -> Vec<u8> {
    asm::program(&[&asm::mov_dx(SERIAL_PORT_BASE as u16), &asm::out_text(text), &asm::HLT])
}

#[test]
fn control_socket_status_pause_resume_stop_under_seccomp() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &print_and_halt(b"ready\n"), 64);
    let mut vmm = spawn(dir, &cfg, &[]);
    vmm.wait_console(b"ready\n");

    let status = vmm.request(&Request::Status);
    assert!(status.ok, "{status:?}");
    let s = status.status.unwrap();
    assert_eq!((s.state.as_str(), s.vcpus, s.memory_mib), ("running", 1, 64));
    assert_eq!(s.pid, vmm.child.id());
    assert!(s.first_exit_unix_ns.unwrap() >= s.started_unix_ns);

    assert!(vmm.request(&Request::Pause).ok);
    assert_eq!(vmm.request(&Request::Status).status.unwrap().state, "paused");
    assert!(vmm.request(&Request::Resume).ok);
    assert_eq!(vmm.request(&Request::Status).status.unwrap().state, "running");
    let swap = vmm.request(&Request::SwapDrive {
        id: "nope".into(),
        path: "/dev/null".into(),
        read_only: true,
    });
    assert!(!swap.ok && swap.error.unwrap().contains("nope"));

    assert!(vmm.request(&Request::Stop).ok);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stderr.contains("HostStop"), "stderr: {stderr}");
}

#[test]
fn guest_reset_exits_zero_and_bad_setups_exit_two() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let code = asm::program(&[
        &asm::mov_dx(SERIAL_PORT_BASE as u16),
        &asm::out_text(b"bye"),
        &asm::mov_al(0xfe),
        &asm::out_imm_al(0x64),
    ]);
    let cfg = config(dir.path(), &code, 32);
    let mut vmm = spawn(dir, &cfg, &[]);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stderr.contains("GuestReset"), "stderr: {stderr}");
    assert_eq!(std::fs::read(&vmm.console).unwrap(), b"bye");

    // A kernel that is not an ELF: a clear error, exit code 2.
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &asm::HLT, 32);
    std::fs::write(&cfg.kernel, b"not an elf").unwrap();
    let (code, stderr) = spawn(dir, &cfg, &[]).wait_exit();
    assert_eq!(code, Some(2));
    assert!(stderr.contains("loading the kernel ELF"), "stderr: {stderr}");

    // Unknown arguments and bad configs too.
    let dir = tempfile::tempdir().unwrap();
    cfg = config(dir.path(), &asm::HLT, 1);
    let (code, stderr) = spawn(dir, &cfg, &[]).wait_exit();
    assert_eq!(code, Some(2));
    assert!(stderr.contains("memory_mib"), "stderr: {stderr}");
}

#[test]
fn jailed_vmm_runs_unprivileged_in_its_own_mount_namespace() {
    if !kvm_available() {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        println!("SKIP: the jail test needs root (to switch uid and mount)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &print_and_halt(b"jailed\n"), 32);
    let mut vmm = spawn(dir, &cfg, &["--jail", "65534:65534"]);
    vmm.wait_console(b"jailed\n");
    let pid = vmm.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid_line = status.lines().find(|l| l.starts_with("Uid:")).unwrap().to_string();
    assert_eq!(uid_line.split_whitespace().skip(1).collect::<Vec<_>>(), ["65534"; 4]);
    let cap_eff = status.lines().find(|l| l.starts_with("CapEff:")).unwrap().to_string();
    assert!(cap_eff.ends_with("0000000000000000"), "{cap_eff}");
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"));
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
    assert_ne!(ours, theirs);
    // Its root holds only the run directory and /dev/kvm.
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let mut top: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    let run_top =
        vmm.run_dir.components().nth(1).unwrap().as_os_str().to_string_lossy().into_owned();
    let mut want = vec!["dev".to_string(), run_top];
    want.sort();
    want.dedup();
    assert_eq!(top, want);
    assert!(root.join("dev/kvm").exists());

    assert!(vmm.request(&Request::Stop).ok);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
}

/// A guest printing more than the console log's cap, from a jailed VMM under seccomp (the
/// serial device cuts the log back on the vCPU thread, through the fd it opened before the
/// jail): the log stays within the cap and holds the newest output.
#[test]
fn a_flooding_guest_leaves_a_capped_console_log() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text: Vec<u8> = (0..800).flat_map(|i| format!("line {i:04}\n").into_bytes()).collect();
    let code = asm::program(&[
        &asm::mov_dx(SERIAL_PORT_BASE as u16),
        &asm::out_text(&text),
        &asm::mov_al(0xfe),
        &asm::out_imm_al(0x64),
    ]);
    let mut cfg = config(dir.path(), &code, 32);
    cfg.console_log_max_bytes = 1024;
    let jail: &[&str] =
        if nix::unistd::geteuid().is_root() { &["--jail", "65534:65534"] } else { &[] };
    let mut vmm = spawn(dir, &cfg, jail);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let console = std::fs::read(&vmm.console).unwrap();
    assert!((512..=1024).contains(&console.len()), "{} bytes kept", console.len());
    assert!(text.ends_with(&console), "not the newest output: {console:?}");
}

#[test]
fn vsock_device_is_visible_over_mmio_and_its_socket_exists() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = podvisor_vmm::layout::MMIO_DEVICES_START as u32;
    let mut code = asm::program(&[&asm::mov_dx(SERIAL_PORT_BASE as u16), &asm::mov_ebx(base)]);
    for reg in [0x0u8, 0x4, 0x8] {
        code.extend_from_slice(&asm::mov_eax_rbx_disp8(reg));
        code.extend_from_slice(&asm::out_eax_bytes());
    }
    code.extend_from_slice(&asm::HLT);
    let mut cfg = config(dir.path(), &code, 32);
    let uds = dir.path().join("run/vsock.sock");
    cfg.vsock = Some(podvisor_vmm::config::VsockConfig { guest_cid: 3, uds: uds.clone() });
    let mut vmm = spawn(dir, &cfg, &[]);
    let mut want = b"virt".to_vec();
    want.extend_from_slice(&2u32.to_le_bytes());
    want.extend_from_slice(&19u32.to_le_bytes()); // virtio-vsock
    vmm.wait_console(&want);
    assert!(uds.exists(), "the hybrid-vsock socket is bound");
    assert!(vmm.request(&Request::Stop).ok);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &print_and_halt(b"up\n"), 32);
    let mut vmm = spawn(dir, &cfg, &[]);
    vmm.wait_console(b"up\n");
    let pid = nix::unistd::Pid::from_raw(vmm.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stderr.contains("HostStop"), "stderr: {stderr}");
    assert!(!vmm.control.exists(), "the control socket is removed on exit");
}

#[test]
fn an_instruction_kvm_cannot_handle_is_a_clean_error_exit() {
    if !kvm_available() {
        return;
    }
    // `int3` with an empty IDT: nested PVM's emulator gives up (KVM internal error, exit 1);
    // hardware KVM triple-faults (guest shutdown, exit 0). Either way the VMM reports and exits.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[0xcc], 32);
    let (code, stderr) = spawn(dir, &cfg, &[]).wait_exit();
    match code {
        Some(1) => assert!(stderr.contains("KVM internal error"), "stderr: {stderr}"),
        Some(0) => assert!(stderr.contains("GuestShutdown"), "stderr: {stderr}"),
        other => panic!("exit {other:?}, stderr: {stderr}"),
    }
    println!("int3 ended with exit code {code:?}");
}

/// The project's vmlinux: `$PODVISOR_KERNEL`, else `build/vmlinux` (from `make kernel`).
fn project_kernel() -> Option<std::path::PathBuf> {
    let path =
        std::env::var_os("PODVISOR_KERNEL").map(std::path::PathBuf::from).unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../build/vmlinux")
        });
    path.exists().then_some(path)
}

/// Boots the real guest kernel far enough to check what the VMM handed it (e820, command
/// line, MP table, KVM detection through CPUID) on the early console. Works on nested PVM too:
/// the kernel gets there before it hits an instruction the emulator cannot run.
#[test]
fn linux_sees_our_e820_cmdline_mptable_and_kvm() {
    if !kvm_available() {
        return;
    }
    let Some(kernel) = project_kernel() else {
        let reason = "no guest kernel (set PODVISOR_KERNEL or run `make kernel`)";
        assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "{reason}");
        println!("SKIP: {reason}");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), &asm::HLT, 256);
    cfg.kernel = kernel;
    cfg.vcpus = 2;
    cfg.cmdline = "earlyprintk=ttyS0 noxsave".into();
    let mut vmm = spawn(dir, &cfg, &[]);
    for line in [
        "Command line: console=ttyS0 reboot=k panic=1 pci=off i8042.noaux no_timer_check tsc=reliable earlyprintk=ttyS0",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
        "Hypervisor detected: KVM",
        "found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]",
    ] {
        vmm.wait_console(line.as_bytes());
    }
    assert!(vmm.request(&Request::Stop).ok);
    let (code, stderr) = vmm.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
}

/// The counting guest of the snapshot tests: its counter at 2 MiB, one count per ~20 ms.
fn counting_guest() -> Vec<u8> {
    asm::counting(0x20_0000, 10_000)
}

#[test]
fn snapshot_over_the_control_socket_restores_in_a_new_process_under_seccomp() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &counting_guest(), 32);
    let mut template = spawn(dir, &cfg, &[]);
    template.wait_console_len(3);
    let snap = template.run_dir.join("snap");
    let running = template.request(&Request::Snapshot { dir: snap.clone() });
    assert!(!running.ok && running.error.unwrap().contains("must be paused"));
    assert!(template.request(&Request::Pause).ok);
    let taken = template.request(&Request::Snapshot { dir: snap.clone() });
    assert!(taken.ok, "{taken:?}");
    assert_eq!(taken.snapshot.unwrap().memory_bytes, 32 << 20);
    let again = template.request(&Request::Snapshot { dir: snap.clone() });
    assert!(!again.ok && again.error.unwrap().contains("already holds a snapshot"));
    let before = std::fs::read(&template.console).unwrap();
    assert!(template.request(&Request::Stop).ok);
    let (code, stderr) = template.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");

    // A new VMM process on a fresh run directory and console starts from the snapshot.
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &counting_guest(), 32);
    let snap_arg = snap.to_str().unwrap();
    let mut restored = spawn(dir, &cfg, &["--restore", snap_arg]);
    let after = restored.wait_console_len(2);
    let last = *before.last().unwrap();
    assert_eq!(after[0], last.wrapping_add(1), "counting resumes after {last}: {after:?}");
    assert_eq!(after[1], after[0].wrapping_add(1));
    assert!(restored.request(&Request::Stop).ok);
    let (code, stderr) = restored.wait_exit();
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stderr.contains("guest restored"), "stderr: {stderr}");

    // A damaged state file: the VMM refuses to start, with the reason, exit code 2.
    let state = snap.join(podvisor_vmm::snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state).unwrap();
    let at = bytes.len() - 10;
    bytes[at] ^= 0x10;
    std::fs::write(&state, bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &counting_guest(), 32);
    let (code, stderr) = spawn(dir, &cfg, &["--restore", snap_arg]).wait_exit();
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("is corrupt: payload CRC-32"), "stderr: {stderr}");
    drop(template);
}
