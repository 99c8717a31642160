//! The CRI server: thin handlers that validate and translate, then call the sandbox manager
//! (RuntimeService) or the image store (ImageService).

pub mod image;
pub mod runtime;

use crate::sandbox::SandboxError;

impl From<SandboxError> for tonic::Status {
    fn from(e: SandboxError) -> Self {
        tonic::Status::new(e.code(), e.to_string())
    }
}
