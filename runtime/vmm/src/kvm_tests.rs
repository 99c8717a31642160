//! Tests on the real /dev/kvm with tiny guest programs (see [`crate::guest_program`]). They
//! run the VMM in the test process without seccomp; `tests/process.rs` covers the `vmm`
//! process with its filters, jail and control socket.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_sregs;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress};

use crate::config::{SeccompMode, VmmConfig};
use crate::devices::virtio::test_utils::DummyDevice;
use crate::guest_program::{asm, elf, LOAD_ADDR};
use crate::layout;
use crate::vmm::Vmm;
use crate::vstate::ExitReason;

/// Whether /dev/kvm can be used; prints why not (and fails under PODVISOR_REQUIRE_E2E=1).
pub(crate) fn kvm_available() -> bool {
    match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            let reason = format!("SKIP: /dev/kvm unavailable: {e}");
            assert!(std::env::var("PODVISOR_REQUIRE_E2E").as_deref() != Ok("1"), "{reason}");
            println!("{reason}");
            false
        }
    }
}

struct Guest {
    _dir: tempfile::TempDir,
    console: PathBuf,
    vmm: Vmm,
}

fn guest(code: &[u8], vcpus: u8) -> Guest {
    let dir = tempfile::tempdir().unwrap();
    let config = guest_config(dir.path(), code, vcpus);
    let console = config.console_log.clone();
    let vmm = Vmm::new(&config).unwrap();
    Guest { _dir: dir, console, vmm }
}

/// The config of a tiny guest running `code`, with its files in `dir`.
pub(crate) fn guest_config(dir: &std::path::Path, code: &[u8], vcpus: u8) -> VmmConfig {
    let kernel = dir.join("prog.elf");
    std::fs::write(&kernel, elf(code)).unwrap();
    let console = dir.join("console.log");
    VmmConfig {
        vcpus,
        memory_mib: 32,
        kernel,
        initrd: None,
        cmdline: String::new(),
        console_log: console.clone(),
        console_log_max_bytes: crate::console::DEFAULT_MAX_BYTES,
        vsock: None,
        drives: vec![],
        nets: vec![],
        fs: vec![],
        seccomp: SeccompMode::Off,
    }
}

/// Loads, runs until exit (or a 60 s watchdog: ring-0 code is emulated on nested PVM), and
/// returns the exit reason and the console bytes.
fn run(mut g: Guest) -> (ExitReason, Vec<u8>) {
    g.vmm.load().unwrap();
    g.vmm.start(None, None).unwrap();
    let run = g.vmm.run_control();
    let watchdog = std::thread::spawn(move || {
        for _ in 0..600 {
            if run.exit.reason().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        run.exit.request(ExitReason::Error("test watchdog: the guest did not finish".into()));
    });
    let reason = g.vmm.run_until_exit();
    watchdog.join().unwrap();
    (reason, std::fs::read(&g.console).unwrap())
}

/// `mov al, 0xfe; out 0x64, al`: i8042 CPU reset.
fn reset() -> Vec<u8> {
    asm::program(&[&asm::mov_al(0xfe), &asm::out_imm_al(0x64)])
}

#[test]
fn boot_state_registers_and_zero_page() {
    if !kvm_available() {
        return;
    }
    let mut g = guest(&asm::HLT, 2);
    let boot = g.vmm.load().unwrap().clone();
    assert_eq!(boot.entry, LOAD_ADDR);
    assert!(boot.cmdline.starts_with("console=ttyS0"));

    for id in 0..2 {
        let vcpu = g.vmm.vcpu_fd(id).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, LOAD_ADDR);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);
        assert_eq!(regs.rflags & 0x2, 0x2);
        let sregs: kvm_sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr0 & 0x8000_0001, 0x8000_0001, "paging + protected mode");
        assert_ne!(sregs.cr4 & 0x20, 0, "PAE");
        assert_eq!(sregs.efer & 0x500, 0x500, "LME + LMA");
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_eq!((sregs.cs.selector, sregs.cs.l, sregs.cs.present), (0x10, 1, 1));
        assert_eq!(sregs.ds.selector, 0x18);
        assert_eq!(sregs.gdt.base, layout::BOOT_GDT_START);
    }

    let mem = g.vmm.guest_memory();
    let zp: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
    let (header, flag, loader) = (zp.hdr.header, zp.hdr.boot_flag, zp.hdr.type_of_loader);
    assert_eq!((header, flag, loader), (0x5372_6448, 0xaa55, 0xff));
    assert_eq!({ zp.hdr.cmd_line_ptr } as u64, layout::CMDLINE_START);
    assert_eq!(zp.e820_entries, 3);
    let last = zp.e820_table[2];
    assert_eq!(({ last.addr }, { last.size }), (0x10_0000, (32 << 20) - 0x10_0000));
    let mut cmdline = vec![0u8; boot.cmdline.len()];
    mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START)).unwrap();
    assert_eq!(cmdline, boot.cmdline.as_bytes());
    let mut mp = [0u8; 4];
    mem.read_slice(&mut mp, GuestAddress(layout::MPTABLE_START)).unwrap();
    assert_eq!(&mp, b"_MP_");
}

#[test]
fn entry_runs_in_64_bit_mode_with_rsi_at_the_zero_page() {
    if !kvm_available() {
        return;
    }
    // `mov rax, imm64` decodes as such only in 64-bit mode; then print "HdrS" from the zero
    // page through rsi.
    let mut code = asm::program(&[
        &asm::mov_dx(layout::SERIAL_PORT_BASE as u16),
        &asm::mov_rax_imm64(u64::from_le_bytes(*b"LONGMODE")),
    ]);
    for _ in 0..8 {
        code.extend_from_slice(&asm::OUT_DX_AL);
        code.extend_from_slice(&asm::shr_rax(8));
    }
    code.extend_from_slice(&asm::mov_eax_rsi_disp(0x202));
    code.extend_from_slice(&asm::out_eax_bytes());
    code.extend_from_slice(&reset());
    let (reason, console) = run(guest(&code, 1));
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(console, b"LONGMODEHdrS");
}

#[test]
fn serial_output_reaches_the_console_log_and_i8042_reset_exits_cleanly() {
    if !kvm_available() {
        return;
    }
    let code = asm::program(&[
        &asm::mov_dx(layout::SERIAL_PORT_BASE as u16),
        &asm::out_text(b"hello from the guest\n"),
        &reset(),
        &asm::SPIN,
    ]);
    let (reason, console) = run(guest(&code, 1));
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(reason.exit_code(), 0);
    assert_eq!(console, b"hello from the guest\n");
}

#[test]
fn mmio_read_of_a_virtio_device_magic_version_and_id() {
    if !kvm_available() {
        return;
    }
    let base = layout::MMIO_DEVICES_START as u32;
    let mut code =
        asm::program(&[&asm::mov_dx(layout::SERIAL_PORT_BASE as u16), &asm::mov_ebx(base)]);
    for reg in [0x0u8, 0x4, 0x8] {
        code.extend_from_slice(&asm::mov_eax_rbx_disp8(reg));
        code.extend_from_slice(&asm::out_eax_bytes());
    }
    code.extend_from_slice(&reset());
    let mut g = guest(&code, 1);
    let (addr, irq) = g.vmm.add_virtio_device(Arc::new(Mutex::new(DummyDevice::new(1)))).unwrap();
    assert_eq!((addr, irq), (layout::MMIO_DEVICES_START, layout::IRQ_BASE));
    let (reason, console) = run(g);
    assert_eq!(reason, ExitReason::GuestReset);
    let mut want = b"virt".to_vec();
    want.extend_from_slice(&2u32.to_le_bytes()); // virtio-mmio version 2
    want.extend_from_slice(&0xffu32.to_le_bytes()); // DummyDevice's id
    assert_eq!(console, want);
}

#[test]
fn odd_guests_end_in_an_exit_reason_not_a_crash() {
    if !kvm_available() {
        return;
    }
    // Unmapped port and MMIO accesses continue; `ud2` with an empty IDT triple-faults.
    let code = asm::program(&[
        &asm::mov_dx(0x1234),
        &asm::mov_al(1),
        &asm::OUT_DX_AL,
        &[0xec], // in al, dx
        &asm::mov_ebx(0xe000_0000),
        &asm::mov_eax_rbx_disp8(0),
        &asm::mov_dx(layout::SERIAL_PORT_BASE as u16),
        &asm::OUT_DX_AL, // eax = 0 from the unmapped MMIO read
        &[0x0f, 0x0b],   // ud2
    ]);
    let (reason, console) = run(guest(&code, 1));
    assert_eq!(console, [0]);
    assert!(
        matches!(reason, ExitReason::GuestShutdown | ExitReason::Error(_)),
        "unexpected {reason:?}"
    );
    println!("ud2 with no IDT ended as {reason:?}");
}

#[test]
fn pause_resume_and_host_stop() {
    if !kvm_available() {
        return;
    }
    let code = asm::program(&[
        &asm::mov_dx(layout::SERIAL_PORT_BASE as u16),
        &asm::out_text(b"up"),
        &asm::SPIN,
    ]);
    let mut g = guest(&code, 2);
    g.vmm.load().unwrap();
    g.vmm.start(None, None).unwrap();
    let run = g.vmm.run_control();
    let console = g.console.clone();
    let driver = std::thread::spawn(move || {
        for _ in 0..300 {
            if std::fs::read(&console).unwrap_or_default() == b"up" {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        run.pause().unwrap();
        assert_eq!(run.control.state(), crate::vstate::RunState::Paused);
        run.resume();
        assert_eq!(run.control.state(), crate::vstate::RunState::Running);
        run.exit.request(ExitReason::HostStop);
    });
    let reason = g.vmm.run_until_exit();
    driver.join().unwrap();
    assert_eq!(reason, ExitReason::HostStop);
}

/// Where the counting guest keeps its counter.
const COUNTER_ADDR: u32 = 0x20_0000;
/// Spin iterations between counts (~20 ms each with ring-0 code emulated on nested PVM).
const COUNT_DELAY: u32 = 10_000;

/// Starts `vmm` with its event loop on a thread of its own; returns the run control and the
/// thread, which yields the exit reason.
fn run_in_background(
    mut vmm: Vmm,
) -> (Arc<crate::vmm::RunControl>, std::thread::JoinHandle<(ExitReason, Vmm)>) {
    vmm.start(None, None).unwrap();
    let run = vmm.run_control();
    let thread = std::thread::spawn(move || {
        let reason = vmm.run_until_exit();
        (reason, vmm)
    });
    (run, thread)
}

/// Waits (up to 60 s) until the file at `path` has at least `len` bytes; returns them.
fn wait_for_output(path: &std::path::Path, len: usize) -> Vec<u8> {
    for _ in 0..600 {
        let bytes = std::fs::read(path).unwrap_or_default();
        if bytes.len() >= len {
            return bytes;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{} did not reach {len} bytes", path.display());
}

fn read_counter(mem: &crate::memory::GuestMemory) -> u32 {
    mem.read_obj(GuestAddress(u64::from(COUNTER_ADDR))).unwrap()
}

/// Boots the counting guest, lets it count to at least 3, pauses and snapshots it into
/// `dir/snap`, stops it; returns the console output and the counter at the snapshot.
fn counting_guest_snapshot(dir: &std::path::Path) -> (Vec<u8>, u32) {
    let code = asm::counting(COUNTER_ADDR, COUNT_DELAY);
    let config = guest_config(dir, &code, 1);
    let mut vmm = Vmm::new(&config).unwrap();
    vmm.load().unwrap();
    let (run, thread) = run_in_background(vmm);
    wait_for_output(&config.console_log, 3);
    run.pause().unwrap();
    let summary = run.snapshot(&dir.join("snap")).unwrap();
    println!("snapshot: {summary:?}");
    assert!(summary.memory_file_allocated_bytes < 1 << 20, "zero pages are holes");
    let console = std::fs::read(&config.console_log).unwrap();
    run.exit.request(ExitReason::HostStop);
    let (reason, vmm) = thread.join().unwrap();
    assert_eq!(reason, ExitReason::HostStop);
    let counter = read_counter(vmm.guest_memory());
    (console, counter)
}

/// A VM restored from `snap` with its console in `dir`, not started yet.
fn restored_guest(dir: &std::path::Path, snap: &std::path::Path) -> (Vmm, PathBuf) {
    let code = asm::counting(COUNTER_ADDR, COUNT_DELAY);
    let config = guest_config(dir, &code, 1);
    let (mut vmm, state) = Vmm::from_snapshot(&config, snap).unwrap();
    vmm.restore(&state).unwrap();
    (vmm, config.console_log)
}

#[test]
fn a_restored_guest_counts_on_from_its_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (before, counter) = counting_guest_snapshot(dir.path());
    let last = *before.last().unwrap();
    // The pause lands between any two instructions: the counter is stored before it is
    // printed, so it is the last printed value or the one after.
    assert!(counter as u8 == last || counter as u8 == last.wrapping_add(1), "{counter} vs {last}");

    let restored_dir = dir.path().join("restored");
    std::fs::create_dir(&restored_dir).unwrap();
    let (vmm, console) = restored_guest(&restored_dir, &dir.path().join("snap"));
    assert_eq!(read_counter(vmm.guest_memory()), counter);
    let (run, thread) = run_in_background(vmm);
    let after = wait_for_output(&console, 3);
    run.exit.request(ExitReason::HostStop);
    assert_eq!(thread.join().unwrap().0, ExitReason::HostStop);
    assert_eq!(after[0], last.wrapping_add(1), "counting resumes after {last}: {after:?}");
    assert_eq!(after[1], after[0].wrapping_add(1));
    assert_eq!(after[2], after[1].wrapping_add(1));
}

#[test]
fn two_restores_of_one_snapshot_share_no_writable_page() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_, counter) = counting_guest_snapshot(dir.path());
    let snap = dir.path().join("snap");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&dir_a).unwrap();
    std::fs::create_dir(&dir_b).unwrap();
    let (a, console_a) = restored_guest(&dir_a, &snap);
    let (b, _) = restored_guest(&dir_b, &snap);

    // The guest in A counts on (writing its counter page); B and the file keep the snapshot.
    let (run_a, thread_a) = run_in_background(a);
    wait_for_output(&console_a, 3);
    run_a.pause().unwrap();
    run_a.exit.request(ExitReason::HostStop);
    let (_, a) = thread_a.join().unwrap();
    let counted = read_counter(a.guest_memory());
    assert!(counted >= counter + 3, "A counted from {counter} to {counted}");
    assert_eq!(read_counter(b.guest_memory()), counter, "A's guest writes reached B");
    // Host-side writes (device DMA) are private too.
    b.guest_memory().write_obj(0x5a5a_5a5au32, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(a.guest_memory().read_obj::<u32>(GuestAddress(0x30_0000)).unwrap(), 0);
    let file = std::fs::read(snap.join(crate::snapshot::MEMORY_FILE)).unwrap();
    let at = COUNTER_ADDR as usize;
    assert_eq!(u32::from_le_bytes(file[at..at + 4].try_into().unwrap()), counter);
    assert!(file[0x30_0000..0x30_0004].iter().all(|&b| b == 0));
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused_with_the_reason() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    counting_guest_snapshot(dir.path());
    let snap = dir.path().join("snap");
    let code = asm::counting(COUNTER_ADDR, COUNT_DELAY);
    let config = guest_config(dir.path(), &code, 1);
    let error = |config: &VmmConfig| match Vmm::from_snapshot(config, &snap) {
        Ok(_) => panic!("restored from a bad snapshot"),
        Err(e) => e.to_string(),
    };

    let two_vcpus = VmmConfig { vcpus: 2, ..config.clone() };
    assert!(error(&two_vcpus).contains("snapshot was taken with 1 vCPUs"), "{}", error(&two_vcpus));
    let mut with_fs = config.clone();
    with_fs.fs.push(crate::config::FsConfig {
        tag: "t".into(),
        socket: "/x".into(),
        kind: crate::config::FsKind::VhostUser,
    });
    assert!(error(&with_fs).contains("vhost-user"), "{}", error(&with_fs));
    // The in-process device keeps no guest memory outside the VMM: its VMs restore.
    with_fs.fs[0].kind = crate::config::FsKind::Inproc;
    assert!(Vmm::from_snapshot(&with_fs, &snap).is_ok());

    // A snapshot whose VM had a virtio device does not restore into one without it.
    let mut vmm = Vmm::new(&config).unwrap();
    vmm.add_virtio_device(Arc::new(Mutex::new(DummyDevice::new(1)))).unwrap();
    let state = crate::snapshot::read_state(&snap).unwrap();
    let err = vmm.restore(&state).unwrap_err().to_string();
    assert!(err.contains("virtio device types [255]"), "{err}");

    let memory = snap.join(crate::snapshot::MEMORY_FILE);
    let full = std::fs::read(&memory).unwrap();
    std::fs::write(&memory, &full[..full.len() - 4096]).unwrap();
    assert!(error(&config).contains("has 33550336 bytes"), "{}", error(&config));
    std::fs::write(&memory, &full).unwrap();

    // A flipped bit in guest memory: the full check finds it (a restore checks the size).
    let state = crate::snapshot::read_state(&snap).unwrap();
    crate::snapshot::verify_memory(&snap, &state).unwrap();
    let mut flipped = full.clone();
    flipped[COUNTER_ADDR as usize] ^= 0x80;
    std::fs::write(&memory, &flipped).unwrap();
    let err = crate::snapshot::verify_memory(&snap, &state).unwrap_err().to_string();
    assert!(err.contains("memory file") && err.contains("is corrupt"), "{err}");
    std::fs::write(&memory, &full).unwrap();

    let state_file = snap.join(crate::snapshot::STATE_FILE);
    let mut bytes = std::fs::read(&state_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&state_file, &bytes).unwrap();
    assert!(error(&config).contains("is corrupt: payload CRC-32"), "{}", error(&config));
    std::fs::write(&state_file, b"").unwrap();
    assert!(error(&config).contains("truncated"), "{}", error(&config));
    std::fs::remove_file(&state_file).unwrap();
    assert!(error(&config).contains("reading the snapshot state file"), "{}", error(&config));
}
