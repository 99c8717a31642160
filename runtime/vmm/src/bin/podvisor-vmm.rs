//! The VMM as a standalone binary, identical to `podvisor vmm ...` (the daemon dispatches that
//! subcommand to the same function). Used by this crate's process tests and benchmarks.

fn main() -> std::process::ExitCode {
    podvisor_vmm::main_with_args(std::env::args().skip(1).collect())
}
