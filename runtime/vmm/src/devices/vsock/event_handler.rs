//! Event-loop side of the vsock device: which fds the core's `event-manager` watches for
//! it and what happens when they fire.

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::VsockDevice;

impl MutEventSubscriber for VsockDevice {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.muxer.epoll_fd() {
            self.process_host_events();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fd = self.muxer.epoll_fd();
        if let Err(err) = ops.add(Events::with_data_raw(fd, 0, EventSet::IN)) {
            tracing::error!("vsock: registering the muxer with the event loop: {err}");
        }
    }
}
