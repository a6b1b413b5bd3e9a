//! The COM1 serial console (16550 UART), the kernel's only console.

use core::fmt;

use spin::Mutex;
use uart_16550::Uart16550;
use uart_16550::backend::PioBackend;

const COM1: u16 = 0x3f8;

static CONSOLE: Mutex<Option<Uart16550<PioBackend>>> = Mutex::new(None);

pub fn init() {
    // SAFETY: COM1 is the standard PC serial port; only this driver uses it.
    let mut uart = unsafe { Uart16550::new_port(COM1) }.expect("COM1 port range is valid");
    // A missing UART is not fatal: the kernel then runs without a console.
    let _ = uart.init(Default::default());
    *CONSOLE.lock() = Some(uart);
}

pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        crate::arch::without_interrupts(|| {
            if let Some(uart) = CONSOLE.lock().as_mut() {
                write_bytes(uart, s.as_bytes());
            }
        });
        Ok(())
    }
}

fn write_bytes(uart: &mut Uart16550<PioBackend>, bytes: &[u8]) {
    for &b in bytes {
        if b == b'\n' {
            uart.send_bytes_exact(b"\r");
        }
        uart.send_bytes_exact(core::slice::from_ref(&b));
    }
}

/// A writer for fault reports that does not wait for the console lock, which
/// the faulting code may hold.
pub struct EmergencyWriter;

impl fmt::Write for EmergencyWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // SAFETY: the UART is only read back by nobody; a fresh handle on the
        // same port can at worst interleave characters with an interrupted
        // writer, which is acceptable while reporting a fatal fault.
        let mut uart = unsafe { Uart16550::new_port(COM1) }.expect("COM1 port range is valid");
        write_bytes(&mut uart, s.as_bytes());
        Ok(())
    }
}

pub fn emergency_writer() -> EmergencyWriter {
    EmergencyWriter
}
