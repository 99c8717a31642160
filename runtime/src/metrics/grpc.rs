//! A tower layer around the CRI server that counts every call by method and gRPC code and
//! times it, so no handler has to. A failed call's code is in its response headers
//! (trailers-only); a successful one's comes in the trailers after its body, so the body is
//! watched for them. A call whose client went away before the end counts as `Cancelled`.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::Code;

use super::Metrics;

/// The CRI services whose methods are counted by name; anything else is `unknown`, so a
/// client cannot grow the label set with paths of its own.
const SERVICES: [&str; 2] = ["/runtime.v1.RuntimeService/", "/runtime.v1.ImageService/"];

#[derive(Clone)]
pub struct CriMetricsLayer {
    metrics: &'static Metrics,
}

impl CriMetricsLayer {
    pub fn new(metrics: &'static Metrics) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for CriMetricsLayer {
    type Service = CriMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CriMetricsService { inner, metrics: self.metrics }
    }
}

#[derive(Clone)]
pub struct CriMetricsService<S> {
    inner: S,
    metrics: &'static Metrics,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for CriMetricsService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Body + Unpin,
{
    type Response = http::Response<MeteredBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // The service that was polled ready serves this call; its clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let metrics = self.metrics;
        let method = method_of(request.uri().path());
        let arrived = Instant::now();
        Box::pin(async move {
            let answered = inner.call(request).await;
            metrics.cri_answered(&method, arrived.elapsed());
            let response = match answered {
                Ok(response) => response,
                Err(e) => {
                    metrics.cri_finished(&method, code_name(Code::Unknown));
                    return Err(e);
                }
            };
            let (parts, body) = response.into_parts();
            let mut body = MeteredBody { inner: body, pending: Some(Pending { metrics, method }) };
            if let Some(code) = parts.headers.get("grpc-status") {
                body.finish(code_of(code));
            }
            Ok(http::Response::from_parts(parts, body))
        })
    }
}

/// The CRI method a request path names (`/runtime.v1.RuntimeService/RunPodSandbox` →
/// `RunPodSandbox`), or `unknown`.
fn method_of(path: &str) -> String {
    SERVICES
        .iter()
        .find_map(|service| path.strip_prefix(service))
        .filter(|m| !m.is_empty() && m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric()))
        .unwrap_or("unknown")
        .to_string()
}

/// The code a `grpc-status` header or trailer carries.
fn code_of(value: &http::HeaderValue) -> &'static str {
    let code = value.to_str().ok().and_then(|v| v.parse::<i32>().ok()).map(Code::from);
    code_name(code.unwrap_or(Code::Unknown))
}

/// A code's name as grpc-go (and so grpc-prometheus, CRI-O, containerd) spells it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// The call's count, until its code is known.
struct Pending {
    metrics: &'static Metrics,
    method: String,
}

/// A response body that counts its call when its trailers (or its end) pass.
pub struct MeteredBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> MeteredBody<B> {
    fn finish(&mut self, code: &str) {
        if let Some(p) = self.pending.take() {
            p.metrics.cri_finished(&p.method, code);
        }
    }
}

impl<B: Body + Unpin> Body for MeteredBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    let code = trailers.get("grpc-status").map(code_of);
                    this.finish(code.unwrap_or(code_name(Code::Unknown)));
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(code_name(Code::Unknown)),
            Poll::Ready(None) => this.finish(code_name(Code::Ok)),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        // Dropped before its end: the client went away (or a stream was cut).
        self.finish(code_name(Code::Cancelled));
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};

    use super::super::tests::sample;
    use super::*;

    /// A body of one data frame and then `grpc-status` trailers, as tonic answers a success.
    struct Answer {
        frames: Vec<Frame<Bytes>>,
    }

    impl Body for Answer {
        type Data = Bytes;
        type Error = Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
            Poll::Ready(if self.frames.is_empty() { None } else { Some(Ok(self.frames.remove(0))) })
        }
    }

    fn answer(status: Option<i32>, trailer: Option<i32>) -> http::Response<Answer> {
        let mut frames = vec![Frame::data(Bytes::from_static(b"message"))];
        if let Some(code) = trailer {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", code.into());
            frames.push(Frame::trailers(trailers));
        }
        let mut response = http::Response::new(Answer { frames });
        if let Some(code) = status {
            response.headers_mut().insert("grpc-status", code.into());
            response.body_mut().frames.clear();
        }
        response
    }

    /// One call answered as `answer(status, trailer)` would, read to the end as a server does.
    async fn call(
        metrics: &'static Metrics,
        path: &str,
        status: Option<i32>,
        trailer: Option<i32>,
    ) {
        let inner = tower::service_fn(move |_req: http::Request<()>| async move {
            Ok::<_, Infallible>(answer(status, trailer))
        });
        let service = CriMetricsLayer::new(metrics).layer(inner);
        let request = http::Request::builder().uri(path).body(()).unwrap();
        let response = service.oneshot(request).await.unwrap();
        let _ = response.into_body().collect().await;
    }

    #[tokio::test]
    async fn calls_are_counted_by_method_and_code_and_timed() {
        let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new().unwrap()));
        let run = "/runtime.v1.RuntimeService/RunPodSandbox";
        call(metrics, run, None, Some(0)).await;
        call(metrics, run, Some(Code::Unavailable as i32), None).await;
        call(metrics, "/runtime.v1.ImageService/PullImage", None, Some(5)).await;
        call(metrics, "/runtime.v1.RuntimeService/Status", None, None).await;
        call(metrics, "/other.Service/Method", Some(12), None).await;
        call(metrics, "/runtime.v1.RuntimeService/../../etc", Some(12), None).await;

        let text = metrics.render().unwrap();
        let count = |method: &str, code: &str| {
            let series =
                format!(r#"podvisor_cri_requests_total{{code="{code}",method="{method}"}}"#);
            sample(&text, &series)
        };
        assert_eq!(count("RunPodSandbox", "OK"), Some(1.0));
        assert_eq!(count("RunPodSandbox", "Unavailable"), Some(1.0));
        assert_eq!(count("PullImage", "NotFound"), Some(1.0));
        // A body that ends without trailers ended well.
        assert_eq!(count("Status", "OK"), Some(1.0));
        assert_eq!(count("unknown", "Unimplemented"), Some(2.0));
        assert_eq!(
            sample(&text, r#"podvisor_cri_request_duration_seconds_count{method="RunPodSandbox"}"#),
            Some(2.0)
        );
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_is_cancelled() {
        let metrics: &'static Metrics = Box::leak(Box::new(Metrics::new().unwrap()));
        let inner = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, Infallible>(answer(None, Some(0)))
        });
        let service = CriMetricsLayer::new(metrics).layer(inner);
        let request = http::Request::builder()
            .uri("/runtime.v1.RuntimeService/GetContainerEvents")
            .body(())
            .unwrap();
        drop(service.oneshot(request).await.unwrap());
        let text = metrics.render().unwrap();
        let series = r#"podvisor_cri_requests_total{code="Canceled",method="GetContainerEvents"}"#;
        assert_eq!(sample(&text, series), Some(1.0));
    }

    #[test]
    fn method_names_are_bounded_to_the_cri_services() {
        assert_eq!(method_of("/runtime.v1.RuntimeService/Version"), "Version");
        assert_eq!(method_of("/runtime.v1.ImageService/ListImages"), "ListImages");
        assert_eq!(method_of("/runtime.v1alpha2.RuntimeService/Version"), "unknown");
        assert_eq!(method_of("/runtime.v1.RuntimeService/"), "unknown");
        assert_eq!(method_of(&format!("/runtime.v1.RuntimeService/{}", "A".repeat(65))), "unknown");
        assert_eq!(code_of(&http::HeaderValue::from_static("14")), "Unavailable");
        assert_eq!(code_of(&http::HeaderValue::from_static("x")), "Unknown");
    }
}
