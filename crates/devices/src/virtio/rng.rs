//! virtio-rng: fills the guest's buffers from the host's getrandom(2).

use std::io::Write;

use virtio_queue::Queue;

use serde::{Deserialize, Serialize};

use super::{drain_queue, Activation, DeviceState, Interrupt, VirtioDevice, TYPE_RNG};
use crate::{GuestMemory, Persist, PersistError};

/// An RNG holds nothing beyond its queue: every buffer is filled when the guest posts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {}

impl Persist for Rng {
    type State = RngState;

    fn save(&self) -> RngState {
        RngState {}
    }

    fn restore(&mut self, _state: RngState) -> Result<(), PersistError> {
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct Rng {
    running: Option<(std::sync::Arc<GuestMemory>, Queue, Interrupt)>,
}

fn host_random(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `len - filled` bytes into the buffer's tail.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n <= 0 {
            return false;
        }
        filled += n as usize;
    }
    true
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }

    fn features(&self) -> u64 {
        0
    }

    fn config(&self) -> Vec<u8> {
        Vec::new()
    }

    fn activate(&mut self, activation: Activation) {
        if let Some(queue) = activation.queues.into_iter().next() {
            self.running = Some((activation.mem, queue, activation.interrupt));
        }
    }

    fn notify(&mut self, _queue: u16) {
        let Some((mem, queue, interrupt)) = self.running.as_mut() else {
            return;
        };
        let mem = mem.clone();
        drain_queue(&mem, queue, interrupt, |chain| {
            let Ok(mut writer) = chain.writer(&mem) else {
                return 0;
            };
            let mut bytes = vec![0u8; writer.available_bytes().min(64 * 1024)];
            if !host_random(&mut bytes) || writer.write_all(&bytes).is_err() {
                return 0;
            }
            bytes.len() as u32
        });
    }

    fn reset(&mut self) {
        self.running = None;
    }

    fn queue_states(&self) -> Option<Vec<super::QueueState>> {
        let (_, queue, _) = self.running.as_ref()?;
        Some(vec![super::QueueState::of(queue)])
    }

    fn save_device(&self) -> DeviceState {
        DeviceState::Rng(self.save())
    }

    fn restore_device(&mut self, state: DeviceState) -> Result<(), PersistError> {
        match state {
            DeviceState::Rng(state) => self.restore(state),
            other => Err(other.refused_by(TYPE_RNG)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::{add_chain, memory, read, Buf, CountingIrq};
    use std::sync::Arc;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;

    #[test]
    fn fills_writable_buffers_with_fresh_bytes() {
        let mem = memory();
        let vq = MockSplitQueue::new(mem.as_ref(), 16);
        let irq = Arc::new(CountingIrq::default());
        let mut rng = Rng::default();
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![vq.create_queue::<Queue>().unwrap()],
            interrupt: Interrupt::new(irq.clone()),
        });
        add_chain(
            &mem,
            &vq,
            0,
            &[Buf {
                addr: 0x20000,
                len: 64,
                device_writes: true,
            }],
        );
        add_chain(
            &mem,
            &vq,
            1,
            &[Buf {
                addr: 0x30000,
                len: 64,
                device_writes: true,
            }],
        );
        rng.notify(0);
        let (a, b) = (read(&mem, 0x20000, 64), read(&mem, 0x30000, 64));
        assert_ne!(a, vec![0; 64]);
        assert_ne!(a, b);
        assert_eq!(irq.count(), 1);
        let (_, queue, _) = rng.running.as_ref().unwrap();
        assert_eq!(queue.next_used(), 2);
    }

    #[test]
    fn an_rng_restores_its_own_state_and_refuses_another_devices() {
        let mut rng = Rng::default();
        let saved = rng.save_device();
        assert_eq!(saved, DeviceState::Rng(RngState {}));
        rng.restore_device(saved).unwrap();
        let console = DeviceState::Console(crate::virtio::console::ConsoleState::default());
        let err = rng.restore_device(console).unwrap_err();
        assert!(
            matches!(
                err,
                PersistError::WrongDevice {
                    saved: 3,
                    actual: 4
                }
            ),
            "{err}"
        );
    }
}
