//! The CRI layer: thin handlers that validate requests and translate them ([`translate`])
//! into the sandbox layer's types (RuntimeService) or call the image store (ImageService),
//! and map the errors they get back to gRPC codes ([`status`]). It is the only layer that
//! knows the CRI's wire types.

pub mod cadvisor;
pub mod create_request;
/// Entry points for `fuzz/` (compiled always, so `make test` checks them and their seeds).
pub mod fuzzing;
pub mod image;
pub mod pod_resources;
pub mod runtime;
pub mod translate;
pub mod unary_route;

use crate::resource::network::NetworkError;
use std::future::Future;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Status};

use crate::agent::{AgentError, Refusal};
use crate::sandbox::seccomp::SeccompError;
use crate::sandbox::spec::SpecError;
use crate::sandbox::SandboxError;
use unary_route::UnaryRoute;

/// The gRPC code of a sandbox-layer error.
pub fn code(e: &SandboxError) -> Code {
    use SandboxError as E;
    match e {
        E::SandboxNotFound(_)
        | E::ContainerNotFound(_)
        | E::ImageNotFound(_)
        | E::VolumeImageNotFound { .. } => Code::NotFound,
        E::SandboxExists { .. } | E::ContainerExists { .. } => Code::AlreadyExists,
        E::SandboxNotReady(_)
        | E::SandboxNotRunning(_)
        | E::ContainerNotCreated { .. }
        | E::ContainerNotRunning(_)
        | E::StoredProcess { .. } => Code::FailedPrecondition,
        E::MountSourceMissing(_)
        | E::ImageSubPath { .. }
        | E::MountSourceNotShared { .. }
        | E::DeviceNotAllowed { .. }
        | E::LimitExceedsVm { .. }
        | E::UnknownHandler { .. }
        | E::HostNamespaceInVm { .. }
        | E::UserNamespaceOnHost
        | E::VmTooLarge { .. }
        | E::PodOutgrowsVm { .. } => Code::InvalidArgument,
        E::Spec(
            SpecError::NoCommand
            | SpecError::UnknownUser(_)
            | SpecError::UnknownGroup(_)
            | SpecError::InvalidId(_)
            | SpecError::UnknownCapability { .. }
            | SpecError::RelativePath { .. }
            | SpecError::EmptyMountPath,
        ) => Code::InvalidArgument,
        // A profile the node does not have or cannot parse is the request's fault; building
        // the runtime's own profile is not.
        E::Spec(SpecError::Seccomp(
            SeccompError::RelativePath(_)
            | SeccompError::Open { .. }
            | SeccompError::Read { .. }
            | SeccompError::NotAFile { .. }
            | SeccompError::TooLarge { .. }
            | SeccompError::Parse { .. }
            | SeccompError::Invalid { .. },
        )) => Code::InvalidArgument,
        E::ExecTimeout { .. } | E::KillTimeout(_) => Code::DeadlineExceeded,
        E::Boot { .. } => Code::Unavailable,
        E::Network(NetworkError::BadAnnotation { .. }) => Code::InvalidArgument,
        E::Network(NetworkError::NotReady(_)) => Code::FailedPrecondition,
        E::Agent(a) => agent_code(a),
        _ => Code::Internal,
    }
}

fn agent_code(e: &AgentError) -> Code {
    match e {
        AgentError::Refused { refusal: Refusal::NotFound, .. } => Code::NotFound,
        AgentError::Refused { refusal: Refusal::InvalidArgument, .. } => Code::InvalidArgument,
        AgentError::Refused { refusal: Refusal::FailedPrecondition, .. } => {
            Code::FailedPrecondition
        }
        AgentError::Refused { refusal: Refusal::Failed, .. } => Code::Internal,
        AgentError::Deadline { .. } => Code::DeadlineExceeded,
        AgentError::Unreachable { .. } | AgentError::Connect(_) => Code::Unavailable,
    }
}

/// The status a sandbox-layer error is answered with.
pub fn status(e: SandboxError) -> Status {
    Status::new(code(&e), e.to_string())
}

/// Serves RuntimeService and ImageService on `listener` until `shutdown` resolves; every call
/// is counted and timed in the daemon's metrics.
pub async fn serve(
    listener: UnixListener,
    runtime: runtime::RuntimeServiceImpl,
    images: image::ImageServiceImpl,
    manager: std::sync::Arc<crate::sandbox::SandboxManager>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let runtime = std::sync::Arc::new(runtime);
    let generated =
        k8s_cri::v1::runtime_service_server::RuntimeServiceServer::from_arc(runtime.clone());
    tonic::transport::Server::builder()
        .layer(crate::metrics::grpc::CriMetricsLayer::new(crate::metrics::global()))
        .add_service(UnaryRoute::new(
            UnaryRoute::new(generated, pod_resources::PATH, pod_resources::UpdateHandler(manager)),
            create_request::PATH,
            create_request::CreateHandler(runtime),
        ))
        .add_service(k8s_cri::v1::image_service_server::ImageServiceServer::new(images))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sandbox_errors_get_their_codes() {
        let cases = [
            (SandboxError::SandboxNotFound("x".into()), Code::NotFound),
            (SandboxError::ImageNotFound("x".into()), Code::NotFound),
            (
                SandboxError::ContainerExists {
                    name: "c".into(),
                    attempt: 0,
                    sandbox: "s".into(),
                    existing: "e".into(),
                },
                Code::AlreadyExists,
            ),
            (SandboxError::ContainerNotRunning("x".into()), Code::FailedPrecondition),
            (
                SandboxError::StoredProcess { id: "x".into(), reason: "bad".into() },
                Code::FailedPrecondition,
            ),
            (
                SandboxError::ExecTimeout { cmd: vec![], timeout: Duration::from_secs(1) },
                Code::DeadlineExceeded,
            ),
            (SandboxError::Boot { sandbox: "s".into(), reason: "r".into() }, Code::Unavailable),
            (
                SandboxError::Agent(AgentError::Deadline {
                    call: "Ping",
                    deadline: Duration::from_secs(1),
                }),
                Code::DeadlineExceeded,
            ),
            (
                SandboxError::Agent(AgentError::Refused {
                    call: "ExecProcess",
                    refusal: Refusal::NotFound,
                    message: "gone".into(),
                }),
                Code::NotFound,
            ),
            (SandboxError::Spec(SpecError::NoCommand), Code::InvalidArgument),
            (
                SandboxError::Spec(SpecError::UnknownCapability {
                    field: "add_capabilities",
                    name: "FLY".into(),
                }),
                Code::InvalidArgument,
            ),
            (
                SandboxError::Spec(SpecError::Seccomp(SeccompError::Open {
                    path: "/p.json".into(),
                    source: std::io::ErrorKind::NotFound.into(),
                })),
                Code::InvalidArgument,
            ),
            (SandboxError::Image("broken".into()), Code::Internal),
        ];
        for (error, expected) in cases {
            assert_eq!(code(&error), expected, "{error}");
        }
    }
}
