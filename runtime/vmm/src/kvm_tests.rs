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
    let kernel = dir.path().join("prog.elf");
    std::fs::write(&kernel, elf(code)).unwrap();
    let console = dir.path().join("console.log");
    let config = VmmConfig {
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
    };
    let vmm = Vmm::new(&config).unwrap();
    Guest { _dir: dir, console, vmm }
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
