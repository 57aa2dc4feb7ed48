//! The 16550A UART at COM1 (vm-superio): the guest kernel's console, written to a log.

use std::io::Write;

use crate::{BusDevice, Irq};

/// COM1's port range and interrupt line.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

#[derive(Debug)]
struct Trigger(Irq);

impl vm_superio::Trigger for Trigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.trigger();
        Ok(())
    }
}

/// A serial port whose output goes to `out` (the console log).
pub struct Serial<W: Write + Send> {
    uart: vm_superio::Serial<Trigger, vm_superio::serial::NoEvents, W>,
}

impl<W: Write + Send> std::fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serial")
    }
}

impl<W: Write + Send> Serial<W> {
    pub fn new(irq: Irq, out: W) -> Self {
        Serial {
            uart: vm_superio::Serial::new(Trigger(irq), out),
        }
    }

    pub fn output(&self) -> &W {
        self.uart.writer()
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::debug!("serial: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IrqLine;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[derive(Debug, Default)]
    struct Count(AtomicU32);
    impl IrqLine for Count {
        fn trigger(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn bytes_written_to_the_data_register_reach_the_log() {
        let irq = Arc::new(Count::default());
        let mut serial = Serial::new(irq.clone(), Vec::new());
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(serial.output(), b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}
