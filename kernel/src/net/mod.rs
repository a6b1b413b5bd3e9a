//! Networking above the NIC driver: the smoltcp device adapter and the
//! machine stack (the VM's own address: ARP, ping, control port). The capsule
//! switch that demultiplexes between machine and capsule stacks comes here too.

pub mod device;
pub mod machine;

/// Current time for smoltcp.
pub fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::from_micros((crate::time::since_boot_ns() / 1000) as i64)
}
