//! Device drivers. They know nothing of the network stack above them.

pub mod fw_cfg;
pub mod pci;
pub mod serial;
pub mod virtio;
