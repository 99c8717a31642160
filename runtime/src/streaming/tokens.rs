//! Single-use tokens for the streaming URLs, as kubelet's request cache: Exec and Attach
//! return a URL whose token stands for the request; it is good for one connection within
//! [`TOKEN_TTL`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Transport;

/// How long a token waits for its client (kubelet's cache keeps them a minute).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Tokens that may wait at once: a client asking for URLs it never uses cannot grow the cache.
pub const MAX_TOKENS: usize = 1024;

/// What a token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRequest {
    Exec {
        container_id: String,
        cmd: Vec<String>,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
    Attach {
        container_id: String,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
    },
    PortForward {
        sandbox_id: String,
    },
}

impl StreamRequest {
    /// The stream protocols the request can be served with over `transport`, in our order of
    /// preference.
    pub fn protocols(&self, transport: Transport) -> &'static [&'static str] {
        use super::{portforward, remotecommand};
        match (self, transport) {
            (Self::Exec { .. } | Self::Attach { .. }, Transport::Spdy) => {
                &remotecommand::spdy::PROTOCOLS
            }
            (Self::Exec { .. } | Self::Attach { .. }, Transport::WebSocket) => {
                &remotecommand::websocket::PROTOCOLS
            }
            (Self::PortForward { .. }, Transport::Spdy) => &portforward::PROTOCOLS,
            (Self::PortForward { .. }, Transport::WebSocket) => &portforward::WEBSOCKET_PROTOCOLS,
        }
    }

    /// The URL path segment the request is served under.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Exec { .. } => "exec",
            Self::Attach { .. } => "attach",
            Self::PortForward { .. } => "portforward",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("too many streaming requests are waiting for their clients ({MAX_TOKENS})")]
    Full,
}

#[derive(Default)]
pub struct Tokens {
    waiting: Mutex<HashMap<String, (StreamRequest, Instant)>>,
}

impl Tokens {
    /// A new token for `request`.
    pub fn issue(&self, request: StreamRequest) -> Result<String, TokenError> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        waiting.retain(|_, (_, issued)| now.duration_since(*issued) < TOKEN_TTL);
        if waiting.len() >= MAX_TOKENS {
            return Err(TokenError::Full);
        }
        let token = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        waiting.insert(token.clone(), (request, now));
        Ok(token)
    }

    /// The request of `token`, once: a used, unknown or expired token gives nothing.
    pub fn redeem(&self, token: &str) -> Option<StreamRequest> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        let (request, issued) = waiting.remove(token)?;
        (issued.elapsed() < TOKEN_TTL).then_some(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attach() -> StreamRequest {
        StreamRequest::Attach {
            container_id: "c".into(),
            tty: false,
            stdin: true,
            stdout: true,
            stderr: true,
        }
    }

    #[test]
    fn tokens_are_single_use_and_unguessable() {
        let tokens = Tokens::default();
        let a = tokens.issue(attach()).unwrap();
        let b = tokens.issue(attach()).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(tokens.redeem(&a), Some(attach()));
        assert_eq!(tokens.redeem(&a), None, "a token is good once");
        assert_eq!(tokens.redeem("nope"), None);
        assert!(tokens.redeem(&b).is_some());
    }

    #[test]
    fn the_cache_is_bounded() {
        let tokens = Tokens::default();
        for _ in 0..MAX_TOKENS {
            tokens.issue(attach()).unwrap();
        }
        assert!(matches!(tokens.issue(attach()), Err(TokenError::Full)));
    }
}
