//! `podvisor fs-serve`: the FUSE server behind the built-in VMM's in-process virtio-fs device
//! (`podvisor_vmm::devices::fuse`), one process per shared directory of a VM.
//!
//! The VMM cannot serve the share itself: it runs jailed as an unprivileged uid, while the
//! share holds files of every owner (root-owned image trees under 0700 directories, volumes with
//! secrets). So the VMM copies each FUSE request out of the guest's ring and sends it over a unix
//! stream socket to this process, which runs as root (as virtiofsd does) and answers with
//! `fuse-backend-rs`' passthrough file system. Framing is FUSE's own: every request starts with
//! a `fuse_in_header` and every reply with a `fuse_out_header`, both led by the message's total
//! length; a request over [`MAX_MESSAGE`] bytes or shorter than its header ends the connection.
//!
//! Life cycle: bind and listen on `--socket`, enter the [`sandbox`] (own mount, network, IPC and
//! UTS namespaces with the shared directory as the root, only the file-serving capabilities,
//! `no_new_privs`, a seccomp allowlist), accept one connection (the VMM's), serve it until the
//! VMM hangs up, exit. A restored VM gets a fresh server: no FUSE session crosses a snapshot.
//!
//! File owners: `--translate-uid` / `--translate-gid` (virtiofsd's syntax, see [`idmap`])
//! translate them between host and guest ids for a pod with a user namespace ([`translate`]).

pub mod idmap;
pub mod sandbox;
pub mod seccomp;
pub mod translate;

use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::Arc;

use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FuseBuf, FuseDevWriter, Reader};

use crate::idmap::{IdMap, IdMaps};
use crate::translate::Translated;

/// Largest FUSE message either way: fuse-backend-rs' 1 MiB data limit plus a page of headers
/// (what its server accepts and what it advertises as max_write / max_pages in FUSE_INIT).
pub const MAX_MESSAGE: usize = (1 << 20) + 4096;
/// `sizeof(struct fuse_in_header)`.
pub const IN_HEADER_LEN: usize = 40;
/// `sizeof(struct fuse_out_header)`.
pub const OUT_HEADER_LEN: usize = 16;

/// FUSE opcodes the server treats specially.
pub mod opcode {
    pub const FORGET: u32 = 2;
    pub const OPEN: u32 = 14;
    pub const SETATTR: u32 = 4;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const WRITE: u32 = 16;
    pub const SETXATTR: u32 = 21;
    pub const REMOVEXATTR: u32 = 24;
    pub const CREATE: u32 = 35;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const RENAME2: u32 = 45;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const TMPFILE: u32 = 51;

    /// Whether the request gets a reply (FORGET and BATCH_FORGET do not).
    pub fn expects_reply(opcode: u32) -> bool {
        opcode != FORGET && opcode != BATCH_FORGET
    }

    /// Requests that change the file system.
    pub fn modifies(opcode: u32) -> bool {
        matches!(
            opcode,
            SETATTR
                | SYMLINK
                | MKNOD
                | MKDIR
                | UNLINK
                | RMDIR
                | RENAME
                | LINK
                | WRITE
                | SETXATTR
                | REMOVEXATTR
                | CREATE
                | FALLOCATE
                | RENAME2
                | COPY_FILE_RANGE
                | TMPFILE
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsServerError {
    #[error(
        "usage: podvisor fs-serve --shared-dir <dir> --socket <path> [--readonly] \
         [--cache never|metadata|auto|always] [--sandbox namespace|none] \
         [--translate-uid <rule>]... [--translate-gid <rule>]... ({0})"
    )]
    Usage(String),
    #[error("--translate-{kind}: {source}")]
    Translation { kind: &'static str, source: idmap::IdMapError },
    #[error("binding {path}: {source}")]
    Bind { path: PathBuf, source: std::io::Error },
    #[error("accepting the VMM's connection: {0}")]
    Accept(std::io::Error),
    #[error("creating the passthrough file system on {path}: {source}")]
    Passthrough { path: PathBuf, source: std::io::Error },
    #[error("opening the shared directory's root: {0}")]
    Import(std::io::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::SandboxError),
    #[error(transparent)]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("reading a request: {0}")]
    ReadRequest(std::io::Error),
    #[error("request of {0} bytes is shorter than its header or longer than {MAX_MESSAGE}")]
    BadRequestLength(u32),
    #[error("writing a reply: {0}")]
    WriteReply(std::io::Error),
    #[error("staging a reply in its memfd: {0}")]
    Staging(std::io::Error),
}

/// How the server confines itself before it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Namespaces, capabilities, `no_new_privs` and seccomp (see [`sandbox`]).
    Namespace,
    /// None (unit tests of the protocol running as an ordinary user).
    None,
}

/// Parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub shared_dir: PathBuf,
    pub socket: PathBuf,
    pub readonly: bool,
    pub cache: String,
    pub sandbox: SandboxMode,
    /// How file owners translate between host and guest (none: as they are).
    pub ids: IdMaps,
}

/// Parses `--shared-dir D --socket S [--readonly] [--cache C] [--sandbox namespace|none]
/// [--translate-uid R]... [--translate-gid R]...`; leading words before the first option
/// (program name, subcommand) are ignored.
pub fn parse_args(args: &[String]) -> Result<Options, FsServerError> {
    let usage = |m: &str| FsServerError::Usage(m.to_string());
    let mut iter = args.iter().skip_while(|a| !a.starts_with("--"));
    let (mut shared_dir, mut socket, mut readonly) = (None, None, false);
    let (mut cache, mut sandbox) = ("auto".to_string(), SandboxMode::Namespace);
    let (mut uid_rules, mut gid_rules) = (Vec::new(), Vec::new());
    while let Some(flag) = iter.next() {
        let mut value = || iter.next().ok_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--shared-dir" => shared_dir = Some(PathBuf::from(value()?)),
            "--socket" => socket = Some(PathBuf::from(value()?)),
            "--readonly" => readonly = true,
            "--cache" => {
                cache = value()?.clone();
                CachePolicy::from_str(&cache).map_err(|_| usage("unknown --cache"))?;
            }
            "--sandbox" => {
                sandbox = match value()?.as_str() {
                    "namespace" => SandboxMode::Namespace,
                    "none" => SandboxMode::None,
                    other => return Err(usage(&format!("unknown --sandbox {other:?}"))),
                }
            }
            "--translate-uid" => uid_rules.push(value()?.clone()),
            "--translate-gid" => gid_rules.push(value()?.clone()),
            other => return Err(usage(&format!("unknown argument {other:?}"))),
        }
    }
    Ok(Options {
        shared_dir: shared_dir.ok_or_else(|| usage("--shared-dir is required"))?,
        socket: socket.ok_or_else(|| usage("--socket is required"))?,
        readonly,
        cache,
        sandbox,
        ids: IdMaps {
            uids: IdMap::parse(&uid_rules)
                .map_err(|source| FsServerError::Translation { kind: "uid", source })?,
            gids: IdMap::parse(&gid_rules)
                .map_err(|source| FsServerError::Translation { kind: "gid", source })?,
        },
    })
}

/// The passthrough file system on `root` (opened by [`FileServer::import`]).
fn passthrough(root: &Path, cache: &str) -> Result<PassthroughFs<()>, FsServerError> {
    let config = Config {
        root_dir: root.to_string_lossy().into_owned(),
        cache_policy: CachePolicy::from_str(cache).unwrap_or_default(),
        // Off, as virtiofsd's default: fuse-backend-rs reaches xattrs through the absolute path
        // /proc/self/fd/N, which inside the sandbox (no /proc) would resolve in the share.
        xattr: false,
        do_import: false,
        ..Config::default()
    };
    PassthroughFs::new(config)
        .map_err(|source| FsServerError::Passthrough { path: root.to_path_buf(), source })
}

/// The file system served: the passthrough, its owners translated.
type ServedFs = Translated<PassthroughFs<()>>;

/// One file system being served.
pub struct FileServer {
    fs: Arc<ServedFs>,
    server: Server<Arc<ServedFs>>,
    readonly: bool,
    request: Vec<u8>,
    reply: Vec<u8>,
    /// fuse-backend-rs writes each reply to this memfd, from which it is forwarded: it
    /// sometimes replies and then returns an error, sometimes only errors, so whether a reply
    /// exists is only known from what was written.
    staged: std::fs::File,
}

impl FileServer {
    /// A server for `root`, file owners translated by `ids`. Nothing is opened under it until
    /// [`Self::import`].
    pub fn new(
        root: &Path,
        cache: &str,
        readonly: bool,
        ids: IdMaps,
    ) -> Result<Self, FsServerError> {
        let fs = Arc::new(Translated::new(passthrough(root, cache)?, ids));
        let staged = nix::sys::memfd::memfd_create(
            c"podvisor-fs-serve-reply",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(|e| FsServerError::Staging(e.into()))?;
        Ok(FileServer {
            staged: staged.into(),
            server: Server::new(fs.clone()),
            fs,
            readonly,
            request: vec![0; MAX_MESSAGE],
            reply: vec![0; MAX_MESSAGE],
        })
    }

    /// Opens the root directory (after the sandbox moved it to `/`, so `..` of the root is
    /// the root).
    pub fn import(&self) -> Result<(), FsServerError> {
        self.fs.inner().import().map_err(FsServerError::Import)
    }

    /// Serves requests from `stream` until the peer hangs up (Ok) or breaks the framing.
    pub fn serve(&mut self, stream: &mut UnixStream) -> Result<(), FsServerError> {
        loop {
            let Some(len) = read_request(stream, &mut self.request)? else {
                return Ok(());
            };
            self.handle(stream.as_raw_fd(), len)?;
        }
    }

    /// Answers the request in the first `len` bytes of the request buffer on `out`.
    fn handle(&mut self, out: std::os::fd::RawFd, len: usize) -> Result<(), FsServerError> {
        let header = &self.request[..IN_HEADER_LEN];
        let opcode = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let mut unique_bytes = [0u8; 8];
        unique_bytes.copy_from_slice(&header[8..16]);
        let unique = u64::from_le_bytes(unique_bytes);
        if self.readonly && (opcode::modifies(opcode) || self.opens_for_writing(opcode, len)) {
            return write_error(out, unique, libc::EROFS);
        }
        self.run_request(opcode, len);
        let staged = self.take_staged()?;
        // Only the first reply goes out (its header says how long it is): a request answered
        // twice must not leave bytes the VMM would read as the next reply.
        let first = (staged >= OUT_HEADER_LEN)
            .then(|| {
                u32::from_le_bytes([self.reply[0], self.reply[1], self.reply[2], self.reply[3]])
            })
            .map(|len| len as usize)
            .filter(|len| (OUT_HEADER_LEN..=staged).contains(len));
        if let Some(len) = first {
            write_all(out, &self.reply[..len])
        } else if opcode::expects_reply(opcode) {
            write_error(out, unique, libc::EINVAL)
        } else {
            Ok(())
        }
    }

    /// Whether the request is an OPEN for writing or truncation (`fuse_open_in.flags` first).
    fn opens_for_writing(&self, opcode: u32, len: usize) -> bool {
        if opcode != opcode::OPEN || len < IN_HEADER_LEN + 4 {
            return false;
        }
        let at = IN_HEADER_LEN;
        let flags = i32::from_le_bytes([
            self.request[at],
            self.request[at + 1],
            self.request[at + 2],
            self.request[at + 3],
        ]);
        flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
    }

    /// Runs the request through fuse-backend-rs, its reply (if any) going to the memfd.
    fn run_request(&mut self, opcode: u32, len: usize) {
        let reader = Reader::<()>::from_fuse_buffer(FuseBuf::new(&mut self.request[..len]));
        let writer = FuseDevWriter::<()>::new(self.staged.as_raw_fd(), &mut self.reply);
        let (Ok(reader), Ok(writer)) = (reader, writer) else {
            return;
        };
        if let Err(err) = self.server.handle_message(reader, writer.into(), None, None) {
            tracing::debug!("fs-serve: opcode {opcode}: {err}");
        }
    }

    /// Moves the staged reply into the reply buffer and rewinds the memfd; returns its length.
    fn take_staged(&mut self) -> Result<usize, FsServerError> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        let staging = |e: std::io::Error| FsServerError::Staging(e);
        let len = self.staged.stream_position().map_err(staging)? as usize;
        if len > self.reply.len() {
            return Err(FsServerError::Staging(std::io::Error::other(
                "reply larger than a message",
            )));
        }
        self.staged.read_exact_at(&mut self.reply[..len], 0).map_err(staging)?;
        self.staged.seek(SeekFrom::Start(0)).map_err(staging)?;
        Ok(len)
    }
}

/// Reads one request into `buf`: its length, or `None` when the peer hung up between requests.
pub fn read_request(
    stream: &mut impl Read,
    buf: &mut [u8],
) -> Result<Option<usize>, FsServerError> {
    let mut got = 0;
    while got < IN_HEADER_LEN {
        match stream.read(&mut buf[got..IN_HEADER_LEN]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FsServerError::ReadRequest(ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(FsServerError::ReadRequest(e)),
        }
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    let total = len as usize;
    if !(IN_HEADER_LEN..=MAX_MESSAGE.min(buf.len())).contains(&total) {
        return Err(FsServerError::BadRequestLength(len));
    }
    stream.read_exact(&mut buf[IN_HEADER_LEN..total]).map_err(FsServerError::ReadRequest)?;
    Ok(Some(total))
}

/// Sends a reply that is only a `fuse_out_header` carrying `-errno`.
fn write_error(out: std::os::fd::RawFd, unique: u64, errno: i32) -> Result<(), FsServerError> {
    let mut reply = [0u8; OUT_HEADER_LEN];
    reply[..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    reply[4..8].copy_from_slice(&(-errno).to_le_bytes());
    reply[8..].copy_from_slice(&unique.to_le_bytes());
    write_all(out, &reply)
}

/// Writes all of `data` to the stream socket `out`.
fn write_all(out: std::os::fd::RawFd, mut data: &[u8]) -> Result<(), FsServerError> {
    while !data.is_empty() {
        // SAFETY: `out` is the open stream socket; `data` is a valid buffer of its length.
        let n = unsafe { libc::write(out, data.as_ptr().cast(), data.len()) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(FsServerError::WriteReply(err));
        }
        if n == 0 {
            return Err(FsServerError::WriteReply(ErrorKind::WriteZero.into()));
        }
        data = &data[n as usize..];
    }
    Ok(())
}

/// Runs the server as `options` says (see the module docs).
pub fn run(options: &Options) -> Result<(), FsServerError> {
    let _ = std::fs::remove_file(&options.socket);
    let listener = UnixListener::bind(&options.socket)
        .map_err(|source| FsServerError::Bind { path: options.socket.clone(), source })?;
    let mut server = match options.sandbox {
        SandboxMode::Namespace => {
            let server = FileServer::new(
                Path::new("/"),
                &options.cache,
                options.readonly,
                options.ids.clone(),
            )?;
            sandbox::enter(&options.shared_dir, options.readonly)?;
            server
        }
        SandboxMode::None => FileServer::new(
            &options.shared_dir,
            &options.cache,
            options.readonly,
            options.ids.clone(),
        )?,
    };
    server.import()?;
    if options.sandbox == SandboxMode::Namespace {
        seccomp::install()?;
    }
    let (mut stream, _) = listener.accept().map_err(FsServerError::Accept)?;
    drop(listener);
    server.serve(&mut stream)
}

/// Entry point of `podvisor fs-serve ...`. Exit codes: 0 when the VMM hung up, 1 on a broken
/// connection, 2 when it could not be set up.
pub fn main_with_args(args: Vec<String>) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e @ (FsServerError::ReadRequest(_)
            | FsServerError::BadRequestLength(_)
            | FsServerError::WriteReply(_)),
        ) => {
            tracing::error!("{e}");
            ExitCode::from(1)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests;
