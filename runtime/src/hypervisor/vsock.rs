//! The host side of Firecracker's hybrid vsock: a unix socket per VM on which the host writes
//! `CONNECT <port>\n` and reads `OK <assigned host port>\n`; after that the unix stream carries
//! the guest's AF_VSOCK connection. vhost-device-vsock (QEMU backend) and the built-in VMM's
//! vsock muxer both speak it.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::{HypervisorError, Result};

/// Opens a stream to guest vsock `port` through the hybrid-vsock socket at `uds`.
pub async fn connect(uds: &Path, port: u32) -> Result<UnixStream> {
    let io_err = |source| HypervisorError::VsockConnect { port, path: uds.to_path_buf(), source };
    let mut stream = UnixStream::connect(uds).await.map_err(io_err)?;
    stream.write_all(format!("CONNECT {port}\n").as_bytes()).await.map_err(io_err)?;
    // Read the answer byte by byte: anything after the newline already belongs to the guest.
    let mut answer = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(io_err)?;
        if n == 0 || answer.len() > 64 {
            break;
        }
        if byte[0] == b'\n' {
            let line = String::from_utf8_lossy(&answer);
            if line.starts_with("OK ") {
                return Ok(stream);
            }
            break;
        }
        answer.push(byte[0]);
    }
    Err(HypervisorError::VsockRefused {
        port,
        answer: String::from_utf8_lossy(&answer).into_owned(),
    })
}
