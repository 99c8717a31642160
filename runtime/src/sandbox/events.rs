//! Lifecycle events of pods and containers (kubelet's Evented PLEG reads them through
//! GetContainerEvents). Every state change of a record emits one, so a VM that died on its
//! own is reported like a stop. As containerd does, a pod's own events carry its sandbox id as
//! the container id.

use std::sync::Arc;

use tokio::sync::broadcast;

use super::records::{ContainerRecord, SandboxRecord};

/// Events a slow subscriber may fall behind before it misses some (it is told how many).
const EVENT_BACKLOG: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Created,
    Started,
    Stopped,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct LifecycleEvent {
    /// The container, or the sandbox itself for a pod's events.
    pub container_id: String,
    pub sandbox_id: String,
    pub kind: EventKind,
    /// Nanoseconds since the epoch.
    pub at: i64,
    /// For a deletion, the records as they were last (they are gone from the store).
    pub last: Option<Arc<LastRecords>>,
}

/// What a deleted pod or container was.
#[derive(Debug, Clone)]
pub struct LastRecords {
    pub sandbox: Option<SandboxRecord>,
    pub containers: Vec<ContainerRecord>,
}

impl LifecycleEvent {
    pub fn is_pod_event(&self) -> bool {
        self.container_id == self.sandbox_id
    }
}

/// The fan-out of lifecycle events.
pub struct Events {
    tx: broadcast::Sender<LifecycleEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Self { tx: broadcast::channel(EVENT_BACKLOG).0 }
    }
}

impl Events {
    pub fn emit(&self, container_id: &str, sandbox_id: &str, kind: EventKind) {
        self.send(container_id, sandbox_id, kind, None);
    }

    /// A deletion, with what was deleted.
    pub fn emit_deleted(&self, container_id: &str, sandbox_id: &str, last: LastRecords) {
        self.send(container_id, sandbox_id, EventKind::Deleted, Some(Arc::new(last)));
    }

    fn send(
        &self,
        container_id: &str,
        sandbox_id: &str,
        kind: EventKind,
        last: Option<Arc<LastRecords>>,
    ) {
        // No subscriber is not an error: nobody is listening.
        let _ = self.tx.send(LifecycleEvent {
            container_id: container_id.to_string(),
            sandbox_id: sandbox_id.to_string(),
            kind,
            at: super::now_nanos(),
            last,
        });
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.tx.subscribe()
    }
}
