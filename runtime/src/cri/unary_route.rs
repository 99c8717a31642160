//! One unary method answered in front of the generated RuntimeService, which serves every
//! other path: how methods k8s-cri 0.11 lacks, or decodes lossily, reach the runtime.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::server::NamedService;
use tonic::{Request, Response, Status};

/// A boxed future of a handler's answer.
pub type Answer<T> = Pin<Box<dyn Future<Output = Result<Response<T>, Status>> + Send>>;

/// What answers the method: its own request and response messages.
pub trait UnaryHandler: Clone + Send + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: prost::Message + Send + 'static;
    fn call(&self, request: Request<Self::Request>) -> Answer<Self::Response>;
}

/// The service `inner`, with the method at `path` answered by `handler`.
#[derive(Clone)]
pub struct UnaryRoute<S, H> {
    inner: S,
    path: &'static str,
    handler: H,
}

impl<S, H> UnaryRoute<S, H> {
    pub fn new(inner: S, path: &'static str, handler: H) -> Self {
        Self { inner, path, handler }
    }
}

impl<S, H> NamedService for UnaryRoute<S, H> {
    const NAME: &'static str = "runtime.v1.RuntimeService";
}

/// Adapts a [`UnaryHandler`] to tonic's unary service.
struct Unary<H>(H);

impl<H: UnaryHandler> tonic::server::UnaryService<H::Request> for Unary<H> {
    type Response = H::Response;
    type Future = Answer<H::Response>;

    fn call(&mut self, request: Request<H::Request>) -> Self::Future {
        self.0.call(request)
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

impl<S, H, B> tower::Service<http::Request<B>> for UnaryRoute<S, H>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible>
        + Send
        + 'static,
    S::Future: Send + 'static,
    H: UnaryHandler,
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != self.path {
            return Box::pin(self.inner.call(req));
        }
        let handler = Unary(self.handler.clone());
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(handler, req).await)
        })
    }
}
