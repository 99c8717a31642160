//! Event-loop side of the net device: which fds the core's `event-manager` watches for
//! it and what happens when they fire.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::NetDevice;

impl MutEventSubscriber for NetDevice {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.backend.as_raw_fd() {
            self.process_backend_events();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.backend.as_raw_fd();
        if let Err(err) =
            ops.add(Events::with_data_raw(fd, 0, EventSet::IN | EventSet::EDGE_TRIGGERED))
        {
            tracing::error!("virtio-net: registering the tap with the event loop: {err}");
        }
    }
}
