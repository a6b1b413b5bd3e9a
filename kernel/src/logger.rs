//! `log` backend on the serial console: `[  uptime] LEVEL target: message`.

use core::fmt::Write;

use capsules_wire::bootcfg::LogLevel;
use log::{LevelFilter, Metadata, Record};

use crate::drivers::serial::Console;

struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let ns = crate::time::since_boot_ns();
        let _ = writeln!(
            Console,
            "[{:5}.{:06}] {:5} {}: {}",
            ns / 1_000_000_000,
            (ns / 1000) % 1_000_000,
            record.level(),
            record.target(),
            record.args()
        );
    }

    fn flush(&self) {}
}

pub fn init(level: LogLevel) {
    let filter = match level {
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warn => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    };
    // A second call (after a refused command line) keeps the first logger.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(filter);
}
