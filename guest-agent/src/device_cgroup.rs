//! The device cgroup of a container: `linux.resources.devices` enforced on cgroup v2, where
//! device access is decided by a `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the
//! cgroup (libcontainer only does this with its libbpf-based `cgroupsv2_devices` feature;
//! the program is small enough to emit and load here with the raw `bpf(2)` syscall, as runc's
//! `devicefilter` emits it).
//!
//! Rules as runc applies them: deny everything, then the spec's rules in order, then runc's
//! standard devices (mknod of any node, null, zero, full, random, urandom, tty, console,
//! ptmx, pts, tun), the last matching rule deciding.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxDeviceCgroup, LinuxDeviceType};

#[derive(Debug, thiserror::Error)]
pub enum DeviceCgroupError {
    #[error("linux.resources.devices[{index}]: access {access:?} is not a subset of \"rwm\"")]
    BadAccess { index: usize, access: String },
    #[error("linux.resources.devices[{index}]: {what} {value} is out of range")]
    BadNumber { index: usize, what: &'static str, value: i64 },
    #[error("loading the device cgroup program: {error} {log}")]
    Load { error: std::io::Error, log: String },
    #[error("opening cgroup {0}: {1}")]
    OpenCgroup(PathBuf, std::io::Error),
    #[error("attaching the device cgroup program to {0}: {1}")]
    Attach(PathBuf, std::io::Error),
}

impl DeviceCgroupError {
    /// The spec's rules are at fault, not the guest.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, Self::BadAccess { .. } | Self::BadNumber { .. })
    }
}

const MKNOD: u8 = 1; // BPF_DEVCG_ACC_MKNOD
const READ: u8 = 2; // BPF_DEVCG_ACC_READ
const WRITE: u8 = 4; // BPF_DEVCG_ACC_WRITE
const ALL_ACCESS: u8 = MKNOD | READ | WRITE;
const BLOCK: i32 = 1; // BPF_DEVCG_DEV_BLOCK
const CHAR: i32 = 2; // BPF_DEVCG_DEV_CHAR

/// One device rule; `None` is a wildcard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    /// BLOCK or CHAR.
    pub typ: Option<i32>,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// MKNOD | READ | WRITE bits.
    pub access: u8,
}

impl Rule {
    const fn allow_char(major: u32, minor: Option<u32>) -> Rule {
        Rule { allow: true, typ: Some(CHAR), major: Some(major), minor, access: ALL_ACCESS }
    }

    /// Matches every device and every access.
    fn is_catch_all(&self) -> bool {
        self.typ.is_none()
            && self.major.is_none()
            && self.minor.is_none()
            && self.access == ALL_ACCESS
    }
}

/// runc's allowed devices (libcontainer/specconv `AllowedDevices`, also youki's defaults).
const STANDARD: &[Rule] = &[
    Rule { allow: true, typ: Some(CHAR), major: None, minor: None, access: MKNOD },
    Rule { allow: true, typ: Some(BLOCK), major: None, minor: None, access: MKNOD },
    Rule::allow_char(1, Some(3)),    // null
    Rule::allow_char(1, Some(5)),    // zero
    Rule::allow_char(1, Some(7)),    // full
    Rule::allow_char(1, Some(8)),    // random
    Rule::allow_char(1, Some(9)),    // urandom
    Rule::allow_char(5, Some(0)),    // tty
    Rule::allow_char(5, Some(1)),    // console
    Rule::allow_char(5, Some(2)),    // ptmx
    Rule::allow_char(136, None),     // pts
    Rule::allow_char(10, Some(200)), // tun
];

/// The OCI rule as a [`Rule`]; `None` for types a device cgroup cannot name (fifo), which
/// match no device.
fn rule_of(index: usize, d: &LinuxDeviceCgroup) -> Result<Option<Rule>, DeviceCgroupError> {
    let typ = match d.typ().unwrap_or(LinuxDeviceType::A) {
        LinuxDeviceType::A => None,
        LinuxDeviceType::B => Some(BLOCK),
        LinuxDeviceType::C | LinuxDeviceType::U => Some(CHAR),
        LinuxDeviceType::P => return Ok(None),
    };
    let number = |what, n: Option<i64>| match n {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n).map(Some).map_err(|_| DeviceCgroupError::BadNumber {
            index,
            what,
            value: n,
        }),
    };
    let text = d.access().clone().unwrap_or_else(|| "rwm".to_string());
    let mut access = 0;
    for c in text.chars() {
        access |= match c {
            'm' => MKNOD,
            'r' => READ,
            'w' => WRITE,
            _ => return Err(DeviceCgroupError::BadAccess { index, access: text.clone() }),
        };
    }
    Ok(Some(Rule {
        allow: d.allow(),
        typ,
        major: number("major", d.major())?,
        minor: number("minor", d.minor())?,
        access,
    }))
}

/// The effective rules of deny-all, `spec_rules` and the standard list (appended, as runc
/// does): the default answer and the rules still to check, a catch-all rule replacing
/// everything before it.
pub fn effective_rules(
    spec_rules: &[LinuxDeviceCgroup],
) -> Result<(bool, Vec<Rule>), DeviceCgroupError> {
    let mut default_allow = false;
    let mut rules: Vec<Rule> = Vec::new();
    for (index, d) in spec_rules.iter().enumerate() {
        let Some(rule) = rule_of(index, d)? else { continue };
        if rule.is_catch_all() {
            default_allow = rule.allow;
            rules.clear();
        } else if rule.access != 0 {
            rules.push(rule);
        }
    }
    rules.extend_from_slice(STANDARD);
    Ok((default_allow, rules))
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | dst, off, imm }
}

const LDX_W: u8 = 0x61; // BPF_LDX | BPF_W | BPF_MEM
const AND32_K: u8 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const RSH32_K: u8 = 0x74; // BPF_ALU | BPF_RSH | BPF_K
const MOV32_X: u8 = 0xbc; // BPF_ALU | BPF_MOV | BPF_X
const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
const JNE_K: u8 = 0x55; // BPF_JMP | BPF_JNE | BPF_K
const JNE_X: u8 = 0x5d; // BPF_JMP | BPF_JNE | BPF_X
const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// The program: r2 = type, r3 = access, r4 = major, r5 = minor from `bpf_cgroup_dev_ctx`;
/// then the rules last first (the last matching rule decides), each a block that jumps to
/// the next one on a mismatch; then the default.
fn program(default_allow: bool, rules: &[Rule]) -> Vec<Insn> {
    let mut p = vec![
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND32_K, 2, 0, 0, 0xffff),
        insn(LDX_W, 3, 1, 0, 0),
        insn(RSH32_K, 3, 0, 0, 16),
        insn(LDX_W, 4, 1, 4, 0),
        insn(LDX_W, 5, 1, 8, 0),
    ];
    for rule in rules.iter().rev() {
        // Checks jump to the block's end (off patched below): r0 = allow; exit.
        let mut block = Vec::new();
        let mut jumps = Vec::new();
        if let Some(typ) = rule.typ {
            jumps.push(block.len());
            block.push(insn(JNE_K, 2, 0, 0, typ));
        }
        if rule.access != ALL_ACCESS {
            // The access asked for must be a subset of the rule's.
            block.push(insn(MOV32_X, 1, 3, 0, 0));
            block.push(insn(AND32_K, 1, 0, 0, i32::from(rule.access)));
            jumps.push(block.len());
            block.push(insn(JNE_X, 1, 3, 0, 0));
        }
        for (reg, number) in [(4, rule.major), (5, rule.minor)] {
            if let Some(n) = number {
                jumps.push(block.len());
                // Device numbers are 32-bit (major 12, minor 20 bits): the cast keeps the bits.
                block.push(insn(JNE_K, reg, 0, 0, n as i32));
            }
        }
        block.push(insn(MOV64_K, 0, 0, 0, i32::from(rule.allow)));
        block.push(insn(EXIT, 0, 0, 0, 0));
        let len = block.len();
        for at in jumps {
            // Short blocks: at most 10 instructions, well inside i16.
            block[at].off = (len - at - 1) as i16;
        }
        p.extend(block);
    }
    p.push(insn(MOV64_K, 0, 0, 0, i32::from(default_allow)));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Programs of nested cgroups run too (all must allow): a container cannot loosen its own.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` for BPF_PROG_LOAD (the fields up to `expected_attach_type`), padded
/// with zeros as the kernel wants of the bytes it does not know.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    padding: [u64; 8],
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    padding: [u32; 11],
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised #[repr(C)] bpf_attr prefix of the size
    // passed; the kernel reads (and for a load's log, writes through pointers we own) only it.
    let r = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>() as u32)
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

fn load(insns: &[Insn]) -> Result<OwnedFd, DeviceCgroupError> {
    const LICENSE: &[u8] = b"Apache\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: LICENSE.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    attr.prog_name[..6].copy_from_slice(b"podvsr");
    match bpf(BPF_PROG_LOAD, &mut attr) {
        // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor we now own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) }),
        Err(error) => {
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let log = String::from_utf8_lossy(&log[..end]).trim().to_string();
            Err(DeviceCgroupError::Load { error, log })
        }
    }
}

/// Makes the cgroup at `cgroup_dir` enforce `spec_rules` (after deny-all and the standard
/// allowed devices). A cgroup whose rules allow everything gets no program.
pub fn apply(cgroup_dir: &Path, spec_rules: &[LinuxDeviceCgroup]) -> Result<(), DeviceCgroupError> {
    let (default_allow, rules) = effective_rules(spec_rules)?;
    if default_allow && rules.iter().all(|r| r.allow) {
        return Ok(());
    }
    let prog = load(&program(default_allow, &rules))?;
    let cgroup = std::fs::File::open(cgroup_dir)
        .map_err(|e| DeviceCgroupError::OpenCgroup(cgroup_dir.to_path_buf(), e))?;
    let mut attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(BPF_PROG_ATTACH, &mut attr)
        .map_err(|e| DeviceCgroupError::Attach(cgroup_dir.to_path_buf(), e))?;
    // The attachment holds the program: our descriptor can go.
    Ok(())
}

#[cfg(test)]
mod tests {
    use oci_spec::runtime::LinuxDeviceCgroupBuilder;

    use super::*;

    fn rule(
        allow: bool,
        typ: LinuxDeviceType,
        major: i64,
        minor: i64,
        access: &str,
    ) -> LinuxDeviceCgroup {
        LinuxDeviceCgroupBuilder::default()
            .allow(allow)
            .typ(typ)
            .major(major)
            .minor(minor)
            .access(access)
            .build()
            .unwrap()
    }

    /// Runs the program on one access the way the kernel would, for the logic's tests.
    fn run(p: &[Insn], typ: i32, access: u8, major: u32, minor: u32) -> bool {
        let ctx = [(u32::from(access) << 16) | typ as u32, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => r[dst] = u64::from(ctx[i.off as usize / 4]),
                AND32_K => r[dst] = (r[dst] as u32 & i.imm as u32) as u64,
                RSH32_K => r[dst] = ((r[dst] as u32) >> i.imm) as u64,
                MOV32_X => r[dst] = r[src] as u32 as u64,
                MOV64_K => r[dst] = i.imm as i64 as u64,
                JNE_K if r[dst] != i.imm as i64 as u64 => pc += i.off as usize,
                JNE_X if r[dst] != r[src] => pc += i.off as usize,
                JNE_K | JNE_X => {}
                EXIT => return r[0] == 1,
                other => panic!("unknown opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn deny_all_keeps_the_standard_devices_and_mknod() {
        let (default_allow, rules) = effective_rules(&[]).unwrap();
        let p = program(default_allow, &rules);
        assert!(run(&p, CHAR, READ | WRITE, 1, 3), "/dev/null");
        assert!(run(&p, CHAR, READ, 136, 7), "a pty");
        assert!(run(&p, BLOCK, MKNOD, 254, 0), "mknod of any node");
        assert!(!run(&p, BLOCK, READ, 254, 0), "the VM's disk");
        assert!(!run(&p, CHAR, WRITE, 1, 11), "kmsg");
        assert!(!run(&p, CHAR, READ | MKNOD, 10, 229), "fuse, not allowed");
    }

    #[test]
    fn spec_rules_apply_in_order_the_last_match_deciding() {
        let spec = [
            rule(true, LinuxDeviceType::C, 10, 229, "rw"),
            rule(false, LinuxDeviceType::C, 1, 3, "w"),
            rule(true, LinuxDeviceType::B, 7, -1, "r"),
            rule(false, LinuxDeviceType::B, 7, 3, "r"),
        ];
        let (default_allow, rules) = effective_rules(&spec).unwrap();
        let p = program(default_allow, &rules);
        assert!(run(&p, CHAR, READ | WRITE, 10, 229));
        // The standard devices come last (as in runc): a spec cannot take /dev/null away.
        assert!(run(&p, CHAR, WRITE, 1, 3));
        assert!(run(&p, BLOCK, READ, 7, 2));
        assert!(!run(&p, BLOCK, WRITE, 7, 2));
        assert!(!run(&p, BLOCK, READ, 7, 3), "the later deny wins");
    }

    #[test]
    fn a_catch_all_rule_replaces_what_came_before() {
        let all = LinuxDeviceCgroupBuilder::default().allow(true).access("rwm").build().unwrap();
        let (default_allow, rules) = effective_rules(std::slice::from_ref(&all)).unwrap();
        assert!(default_allow && rules.iter().all(|r| r.allow));
        let deny = LinuxDeviceCgroupBuilder::default().allow(false).build().unwrap();
        let (default_allow, rules) = effective_rules(&[all, deny]).unwrap();
        assert_eq!((default_allow, rules.as_slice()), (false, STANDARD));
        assert!(!run(&program(default_allow, &rules), CHAR, READ, 1, 11));
    }

    #[test]
    fn bad_rules_are_refused_naming_them() {
        let bad = rule(true, LinuxDeviceType::C, 1, 3, "rwx");
        let err = effective_rules(&[bad]).unwrap_err();
        assert!(err.to_string().starts_with("linux.resources.devices[0]"), "{err}");
        let big = rule(true, LinuxDeviceType::C, 1 << 40, 3, "r");
        assert!(matches!(effective_rules(&[big]), Err(DeviceCgroupError::BadNumber { .. })));
    }

    /// The kernel's verifier accepts the program (needs root and a kernel with BPF).
    #[test]
    fn the_kernel_loads_the_program() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let spec = [rule(true, LinuxDeviceType::B, 7, -1, "r")];
        let (default_allow, rules) = effective_rules(&spec).unwrap();
        load(&program(default_allow, &rules)).unwrap();
    }

    /// A shell moved into a cgroup with the rules attached opens /dev/null but not /dev/kmsg
    /// (1:11, not allowed), with EPERM. Needs root and a cgroup2 mount (this host's hybrid
    /// hierarchy has one at /sys/fs/cgroup/unified).
    #[test]
    fn an_attached_cgroup_refuses_devices_not_allowed() {
        let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.procs").exists() && !p.join("tasks").exists());
        let (true, Some(root)) = (nix::unistd::geteuid().is_root(), root) else { return };
        let dir = root.join(format!("podvisor-device-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        apply(&dir, &[]).unwrap();
        let procs = dir.join("cgroup.procs");
        let sh = |script: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("echo $$ > {} && {script}", procs.display()))
                .output()
                .unwrap()
        };
        let null = sh(": < /dev/null && : > /dev/null");
        let kmsg = sh(": < /dev/kmsg");
        let _ = std::fs::remove_dir(&dir);
        assert!(null.status.success(), "{}", String::from_utf8_lossy(&null.stderr));
        assert!(!kmsg.status.success());
        let err = String::from_utf8_lossy(&kmsg.stderr);
        assert!(err.contains("Operation not permitted"), "{err}");
    }
}
