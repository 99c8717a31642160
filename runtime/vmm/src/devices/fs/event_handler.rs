//! Event-loop side of the fs device: which fds the core's `event-manager` watches for
//! it and what happens when they fire.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::VhostUserFsDevice;

impl MutEventSubscriber for VhostUserFsDevice {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.process_call_events();
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (index, evt) in self.call_evts.iter().enumerate() {
            if let Err(err) =
                ops.add(Events::with_data_raw(evt.as_raw_fd(), index as u32, EventSet::IN))
            {
                tracing::error!("virtio-fs: registering call eventfd {index}: {err}");
            }
        }
    }
}
