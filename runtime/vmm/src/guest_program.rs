//! Tiny hand-assembled x86-64 guest programs wrapped in a minimal ELF "kernel", so that tests
//! and benchmarks boot them through exactly the path a real vmlinux takes.

/// Where the program is loaded and entered (the usual kernel area).
pub const LOAD_ADDR: u64 = crate::layout::HIMEM_START;

/// A minimal ELF64 executable with one PT_LOAD segment holding `code` at [`LOAD_ADDR`], whose
/// entry point is the first byte of `code`.
pub fn elf(code: &[u8]) -> Vec<u8> {
    const EHDR_SIZE: u16 = 64;
    const PHDR_SIZE: u16 = 56;
    const CODE_OFFSET: u64 = 0x1000;
    let mut out = Vec::with_capacity(CODE_OFFSET as usize + code.len());
    // e_ident: magic, 64-bit, little endian, version 1, System V ABI.
    out.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
    out.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
    out.extend_from_slice(&1u32.to_le_bytes()); // e_version
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // e_entry
    out.extend_from_slice(&u64::from(EHDR_SIZE).to_le_bytes()); // e_phoff
    out.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    out.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    out.extend_from_slice(&EHDR_SIZE.to_le_bytes());
    out.extend_from_slice(&PHDR_SIZE.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    out.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
                                    // Program header: PT_LOAD, R+X.
    out.extend_from_slice(&1u32.to_le_bytes());
    out.extend_from_slice(&5u32.to_le_bytes());
    out.extend_from_slice(&CODE_OFFSET.to_le_bytes());
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_vaddr
    out.extend_from_slice(&LOAD_ADDR.to_le_bytes()); // p_paddr
    out.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_filesz
    out.extend_from_slice(&(code.len() as u64).to_le_bytes()); // p_memsz
    out.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    out.resize(CODE_OFFSET as usize, 0);
    out.extend_from_slice(code);
    out
}

/// Encodings of the few instructions the test programs use (64-bit mode).
pub mod asm {
    /// `mov dx, port`
    pub fn mov_dx(port: u16) -> Vec<u8> {
        let mut v = vec![0x66, 0xba];
        v.extend_from_slice(&port.to_le_bytes());
        v
    }
    /// `mov al, imm8`
    pub fn mov_al(value: u8) -> Vec<u8> {
        vec![0xb0, value]
    }
    /// `out dx, al`
    pub const OUT_DX_AL: [u8; 1] = [0xee];
    /// `out imm8, al`
    pub fn out_imm_al(port: u8) -> Vec<u8> {
        vec![0xe6, port]
    }
    /// `mov rax, imm64` (REX.W B8: only decodes this way in 64-bit mode)
    pub fn mov_rax_imm64(value: u64) -> Vec<u8> {
        let mut v = vec![0x48, 0xb8];
        v.extend_from_slice(&value.to_le_bytes());
        v
    }
    /// `shr rax, imm8`
    pub fn shr_rax(bits: u8) -> Vec<u8> {
        vec![0x48, 0xc1, 0xe8, bits]
    }
    /// `mov eax, [rsi + disp32]`
    pub fn mov_eax_rsi_disp(disp: u32) -> Vec<u8> {
        let mut v = vec![0x8b, 0x86];
        v.extend_from_slice(&disp.to_le_bytes());
        v
    }
    /// `mov ebx, imm32` (zero-extends into rbx)
    pub fn mov_ebx(value: u32) -> Vec<u8> {
        let mut v = vec![0xbb];
        v.extend_from_slice(&value.to_le_bytes());
        v
    }
    /// `mov eax, [rbx + disp8]`
    pub fn mov_eax_rbx_disp8(disp: u8) -> Vec<u8> {
        vec![0x8b, 0x43, disp]
    }
    /// `hlt`
    pub const HLT: [u8; 1] = [0xf4];
    /// `jmp $` (spin forever)
    pub const SPIN: [u8; 2] = [0xeb, 0xfe];

    /// Writes the 4 bytes of eax, low byte first, to the port in dx (clobbers eax).
    pub fn out_eax_bytes() -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.extend_from_slice(&OUT_DX_AL);
            v.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
        }
        v
    }

    /// Writes `text` to the port in dx.
    pub fn out_text(text: &[u8]) -> Vec<u8> {
        text.iter().flat_map(|&c| [0xb0, c, 0xee]).collect()
    }

    /// Concatenates instruction encodings.
    pub fn program(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// A guest that counts forever: it increments ebx, stores it at guest-physical
    /// `counter_addr` (identity-mapped by the boot page tables), writes its low byte to the
    /// serial port, then spins `delay` iterations. Its whole state is in registers and that
    /// one word, which makes it a probe for snapshot/restore.
    pub fn counting(counter_addr: u32, delay: u32) -> Vec<u8> {
        let mut code = mov_dx(crate::layout::SERIAL_PORT_BASE as u16);
        code.extend_from_slice(&[0x31, 0xdb]); // xor ebx, ebx
        let outer = code.len();
        code.extend_from_slice(&[0xff, 0xc3]); // inc ebx
        code.extend_from_slice(&[0x89, 0x1c, 0x25]); // mov [disp32], ebx
        code.extend_from_slice(&counter_addr.to_le_bytes());
        code.extend_from_slice(&[0x89, 0xd8]); // mov eax, ebx
        code.extend_from_slice(&OUT_DX_AL);
        code.push(0xb9); // mov ecx, imm32
        code.extend_from_slice(&delay.to_le_bytes());
        code.extend_from_slice(&[0xff, 0xc9, 0x75, 0xfc]); // dec ecx; jnz (back to dec)
        let back = code.len() + 2 - outer;
        code.extend_from_slice(&[0xeb, (back as u8).wrapping_neg()]); // jmp outer
        code
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn the_elf_loads_through_linux_loader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prog.elf");
        std::fs::write(&path, elf(&asm::HLT)).unwrap();
        let mem = create_guest_memory(16 << 20).unwrap();
        let kernel = crate::arch::boot::load_kernel(&mem, &path).unwrap();
        assert_eq!((kernel.entry, kernel.end, kernel.pvh_entry), (LOAD_ADDR, LOAD_ADDR + 1, None));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(LOAD_ADDR)).unwrap(), 0xf4);
    }
}
