//! Exit codes a kernel reports through QEMU's `isa-debug-exit` device.
//!
//! The device is placed at [`DEBUG_EXIT_PORT`]; writing value `v` ends QEMU
//! with process status `(v << 1) | 1`. Every code here is therefore odd and
//! distinct from QEMU's own statuses (0 = normal exit, 1 = QEMU error).

/// I/O port of the `isa-debug-exit` device (`-device isa-debug-exit,iobase=0xf4,iosize=0x04`).
pub const DEBUG_EXIT_PORT: u16 = 0xf4;

/// Why the kernel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum KernelExit {
    /// Clean shutdown (control request) or all in-kernel tests passed.
    Success = 0x10,
    /// An in-kernel test failed.
    TestFailed = 0x11,
    /// The kernel panicked.
    Panic = 0x12,
    /// An unhandled CPU exception in kernel code.
    Exception = 0x13,
    /// The command line was malformed; the kernel refused to run misconfigured.
    BadConfig = 0x14,
}

impl KernelExit {
    /// The value written to the debug-exit port.
    pub const fn code(self) -> u32 {
        self as u32
    }

    /// The QEMU process exit status this produces.
    pub const fn qemu_status(self) -> i32 {
        ((self as u32) << 1 | 1) as i32
    }

    /// Maps a QEMU process exit status back to the kernel's reason.
    pub fn from_qemu_status(status: i32) -> Option<Self> {
        [
            Self::Success,
            Self::TestFailed,
            Self::Panic,
            Self::Exception,
            Self::BadConfig,
        ]
        .into_iter()
        .find(|k| k.qemu_status() == status)
    }

    pub const fn describe(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::TestFailed => "test failed",
            Self::Panic => "kernel panic",
            Self::Exception => "unhandled CPU exception",
            Self::BadConfig => "bad kernel command line",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip_and_are_distinct() {
        let all = [
            KernelExit::Success,
            KernelExit::TestFailed,
            KernelExit::Panic,
            KernelExit::Exception,
            KernelExit::BadConfig,
        ];
        for k in all {
            assert_eq!(KernelExit::from_qemu_status(k.qemu_status()), Some(k));
            assert_ne!(k.qemu_status(), 0);
            assert_ne!(k.qemu_status(), 1);
        }
        assert_eq!(KernelExit::Success.qemu_status(), 33);
        assert_eq!(KernelExit::from_qemu_status(0), None);
    }
}
