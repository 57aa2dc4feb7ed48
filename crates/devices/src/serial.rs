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

    /// A serial port in a saved state (the guest driver's registers and unread input).
    pub fn restored(irq: Irq, out: W, state: &SerialState) -> std::io::Result<Self> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart =
            vm_superio::Serial::from_state(&state, Trigger(irq), vm_superio::serial::NoEvents, out)
                .map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("serial state: {e:?}"),
                    )
                })?;
        Ok(Serial { uart })
    }

    pub fn state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// The UART's registers as a snapshot stores them (vm-superio's `SerialState`, serializable).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
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
    fn a_restored_port_keeps_the_drivers_registers() {
        let irq = Arc::new(Count::default());
        let mut serial = Serial::new(irq.clone(), Vec::new());
        serial.write(1, &[0x02]); // IER: transmitter empty interrupt
        serial.write(3, &[0x83]); // LCR: DLAB, 8N1
        serial.write(0, &[0x01]); // divisor low
        serial.write(7, &[0x5a]); // scratch
        let state = serial.state();
        let mut restored = Serial::restored(irq, Vec::new(), &state).unwrap();
        assert_eq!(restored.state(), state);
        let mut byte = [0u8];
        restored.read(7, &mut byte);
        assert_eq!(byte, [0x5a]);
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
