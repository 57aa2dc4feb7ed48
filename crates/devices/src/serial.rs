//! The 16550A UART at COM1 (vm-superio): the guest kernel's console, written to a log.

use std::io::Write;

use crate::{BusDevice, Irq, Persist, PersistError};

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

type Uart<W> = vm_superio::Serial<Trigger, vm_superio::serial::NoEvents, W>;

/// The most bytes of guest input the UART holds (its FIFO).
const FIFO_CAPACITY: usize = 64;

/// A serial port whose output goes to `out` (the console log).
pub struct Serial<W: Write + Send> {
    irq: Irq,
    /// Always there but while [`Persist::restore`] rebuilds it around the same writer
    /// (vm-superio builds a port in a given state only by value).
    uart: Option<Uart<W>>,
}

impl<W: Write + Send> std::fmt::Debug for Serial<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Serial")
    }
}

impl<W: Write + Send> Serial<W> {
    pub fn new(irq: Irq, out: W) -> Self {
        Serial {
            uart: Some(vm_superio::Serial::new(Trigger(irq.clone()), out)),
            irq,
        }
    }

    pub fn output(&self) -> Option<&W> {
        self.uart.as_ref().map(|u| u.writer())
    }
}

impl<W: Write + Send> Persist for Serial<W> {
    type State = SerialState;

    fn save(&self) -> SerialState {
        let Some(uart) = &self.uart else {
            return SerialState::default();
        };
        let s = uart.state();
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

    /// The guest driver's registers and unread input.
    fn restore(&mut self, state: SerialState) -> Result<(), PersistError> {
        // Checked first so that the rebuild below cannot fail and lose the writer.
        if state.in_buffer.len() > FIFO_CAPACITY {
            return Err(PersistError::Serial(format!(
                "{} bytes of input, the FIFO holds {FIFO_CAPACITY}",
                state.in_buffer.len()
            )));
        }
        let uart = self
            .uart
            .take()
            .ok_or_else(|| PersistError::Serial("the port was lost by a failed restore".into()))?;
        let saved = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer,
        };
        let uart = vm_superio::Serial::from_state(
            &saved,
            Trigger(self.irq.clone()),
            vm_superio::serial::NoEvents,
            uart.into_writer(),
        )
        .map_err(|e| PersistError::Serial(e.to_string()))?;
        self.uart = Some(uart);
        Ok(())
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
        if let (Some(first), Some(uart)) = (data.first_mut(), self.uart.as_mut()) {
            *first = uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&value), Some(uart)) = (data.first(), self.uart.as_mut()) {
            if let Err(e) = uart.write(offset as u8, value) {
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
        let state = serial.save();
        let mut restored = Serial::new(irq, Vec::new());
        restored.restore(state.clone()).unwrap();
        assert_eq!(restored.save(), state);
        let mut byte = [0u8];
        restored.read(7, &mut byte);
        assert_eq!(byte, [0x5a]);
        // The writer survives the restore.
        restored.write(3, &[0x03]); // LCR: DLAB off
        restored.write(0, b"x");
        assert_eq!(restored.output().unwrap(), b"x");
    }

    #[test]
    fn a_state_with_more_input_than_the_fifo_holds_is_refused_and_the_port_kept() {
        let irq = Arc::new(Count::default());
        let mut serial = Serial::new(irq, Vec::new());
        let state = SerialState {
            in_buffer: vec![b'a'; FIFO_CAPACITY + 1],
            ..SerialState::default()
        };
        let err = serial.restore(state).unwrap_err();
        assert!(matches!(err, PersistError::Serial(_)), "{err}");
        serial.write(0, b"y");
        assert_eq!(serial.output().unwrap(), b"y");
    }

    #[test]
    fn bytes_written_to_the_data_register_reach_the_log() {
        let irq = Arc::new(Count::default());
        let mut serial = Serial::new(irq.clone(), Vec::new());
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(serial.output().unwrap(), b"hi\n");
        // Line status: transmitter empty.
        let mut lsr = [0];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }
}

/// A VM's console log, bounded: once it holds [`CONSOLE_LOG_CAP`] bytes its contents move
/// to `<path>.1` (replacing what was there) and it begins again, so a guest that prints
/// without end costs the host at most twice the cap (the log lives on `/run`, in host
/// memory). Each write goes to the file at once: a VMM that crashes loses nothing written.
/// Both files are opened when the log is created, and a rotation only copies and truncates
/// through their descriptors: the builtin VMM's vCPU thread, which writes the log, may not
/// open or rename files (`jail::thread`).
#[derive(Debug)]
pub struct ConsoleLog {
    file: std::fs::File,
    previous: std::fs::File,
    written: u64,
    cap: u64,
}

/// The size at which a console log is rotated.
pub const CONSOLE_LOG_CAP: u64 = 1 << 20;

impl ConsoleLog {
    pub fn create(path: &std::path::Path) -> std::io::Result<Self> {
        Self::with_cap(path, CONSOLE_LOG_CAP)
    }

    pub fn with_cap(path: &std::path::Path, cap: u64) -> std::io::Result<Self> {
        let open = |path: &std::path::Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
        };
        Ok(ConsoleLog {
            file: open(path)?,
            previous: open(&Self::previous(path))?,
            written: 0,
            cap,
        })
    }

    /// The rotated-out part of the log at `path`.
    pub fn previous(path: &std::path::Path) -> std::path::PathBuf {
        let mut name = path.as_os_str().to_os_string();
        name.push(".1");
        name.into()
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        self.previous.set_len(0)?;
        self.previous.seek(SeekFrom::Start(0))?;
        self.file.seek(SeekFrom::Start(0))?;
        std::io::copy(&mut self.file, &mut self.previous)?;
        self.file.set_len(0)?;
        self.file.seek(SeekFrom::Start(0))?;
        self.written = 0;
        Ok(())
    }
}

impl Write for ConsoleLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written >= self.cap {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod console_log_tests {
    use super::*;

    #[test]
    fn a_console_log_is_rotated_at_its_cap_and_never_holds_more_than_twice_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut log = ConsoleLog::with_cap(&path, 1000).unwrap();
        for i in 0..10_000 {
            writeln!(log, "line {i}").unwrap();
        }
        let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
        let previous = ConsoleLog::previous(&path);
        assert!(size(&path) <= 1000 + 16, "{}", size(&path));
        assert!(size(&previous) <= 1000 + 16, "{}", size(&previous));
        // The newest lines are in the log, the ones just before them in the previous part
        // (a rotation may fall within a line: the two read on from one another).
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.ends_with("line 9999\n"), "{text}");
        let both = std::fs::read_to_string(&previous).unwrap() + &text;
        let numbers: Vec<u32> = both
            .lines()
            .skip(1)
            .map(|line| line[5..].parse().unwrap())
            .collect();
        assert!(numbers.windows(2).all(|w| w[0] + 1 == w[1]), "{both}");
    }
}
