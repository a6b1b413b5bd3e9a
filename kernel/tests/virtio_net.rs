//! In-kernel tests of virtio-net bring-up and interrupt-driven receive. The
//! runner gives the VM two virtio-net devices joined by a QEMU-internal hub,
//! so a frame sent on one arrives on the other without any host network.

#![no_std]
#![no_main]

use capsules_kernel::boot::BootInfo;
use capsules_kernel::drivers::virtio::net::{self, VirtioNet};
use capsules_kernel::testing::{Test, run};
use capsules_kernel::{arch, time};
use spin::Mutex;

static NICS: Mutex<Option<(VirtioNet, VirtioNet)>> = Mutex::new(None);

fn ethernet_frame(src: [u8; 6], payload_byte: u8, len: usize) -> [u8; net::MAX_FRAME] {
    let mut frame = [payload_byte; net::MAX_FRAME];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    frame[14..18].copy_from_slice(&(len as u32).to_be_bytes());
    frame
}

/// Waits (halting between interrupts) until `receiver` has a frame.
fn wait_for_frame(receiver: &mut VirtioNet) -> Option<([u8; net::MAX_FRAME], usize)> {
    let deadline = time::since_boot_ns() + 2_000_000_000;
    while time::since_boot_ns() < deadline {
        receiver.service_interrupt();
        let mut copy = [0u8; net::MAX_FRAME];
        if let Some(len) = receiver.receive(|f| {
            copy[..f.len()].copy_from_slice(f);
            f.len()
        }) {
            return Some((copy, len));
        }
        arch::disable_interrupts();
        if receiver.has_work() {
            arch::enable_interrupts();
        } else {
            arch::wait_for_interrupt();
        }
    }
    None
}

fn both_devices_come_up() {
    arch::enable_interrupts();
    let sender = VirtioNet::init(0, false).expect("first virtio-net");
    let receiver = VirtioNet::init(1, true).expect("second virtio-net");
    assert_eq!(sender.mac(), [0x52, 0x54, 0, 0, 0, 1]);
    assert_eq!(receiver.mac(), [0x52, 0x54, 0, 0, 0, 2]);
    assert!(receiver.uses_interrupts(), "no interrupt line routed");
    assert!(net::find(2).is_none(), "a third NIC appeared");
    *NICS.lock() = Some((sender, receiver));
}

fn frames_cross_and_raise_interrupts() {
    let mut guard = NICS.lock();
    let (sender, receiver) = guard.as_mut().expect("devices up");
    let irqs_before = net::interrupt_count();
    // Minimal, ordinary, full standard and full jumbo frames.
    for (i, len) in [60usize, 600, 1514, net::MAX_FRAME].into_iter().enumerate() {
        let frame = ethernet_frame(sender.mac(), i as u8 + 1, len);
        sender
            .transmit(len, |buf| buf.copy_from_slice(&frame[..len]))
            .expect("transmit");
        let (got, got_len) = wait_for_frame(receiver).expect("frame did not arrive");
        assert_eq!(got_len, len);
        assert_eq!(&got[..len], &frame[..len], "frame {i} corrupted");
    }
    assert!(
        net::interrupt_count() > irqs_before,
        "receive raised no interrupt"
    );
    let rx = receiver.counters();
    assert_eq!(rx.rx_packets, 4);
    assert_eq!(rx.rx_bytes, (60 + 600 + 1514 + net::MAX_FRAME) as u64);
    let tx = sender.counters();
    assert_eq!(tx.tx_packets, 4);
}

fn oversized_transmit_is_refused() {
    let mut guard = NICS.lock();
    let (sender, _) = guard.as_mut().expect("devices up");
    let before = sender.counters().tx_packets;
    assert!(sender.transmit(net::MAX_FRAME + 1, |_| ()).is_none());
    assert_eq!(sender.counters().tx_packets, before);
}

fn sustained_traffic_recycles_buffers() {
    let mut guard = NICS.lock();
    let (sender, receiver) = guard.as_mut().expect("devices up");
    // Several times the queue size: buffers must be reposted and reclaimed.
    for i in 0..(4 * net::QUEUE_SIZE) {
        let frame = ethernet_frame(sender.mac(), i as u8, 200);
        let mut sent = false;
        for _ in 0..1000 {
            if sender
                .transmit(200, |buf| buf.copy_from_slice(&frame[..200]))
                .is_some()
            {
                sent = true;
                break;
            }
            core::hint::spin_loop();
        }
        assert!(sent, "transmit buffers never came back (frame {i})");
        let (got, len) = wait_for_frame(receiver).expect("frame lost");
        assert_eq!((len, got[20]), (200, i as u8));
    }
}

#[unsafe(no_mangle)]
fn kernel_main(_info: &'static BootInfo) -> ! {
    run(
        "virtio_net",
        &[
            Test {
                name: "both_devices_come_up",
                run: both_devices_come_up,
            },
            Test {
                name: "frames_cross_and_raise_interrupts",
                run: frames_cross_and_raise_interrupts,
            },
            Test {
                name: "oversized_transmit_is_refused",
                run: oversized_transmit_is_refused,
            },
            Test {
                name: "sustained_traffic_recycles_buffers",
                run: sustained_traffic_recycles_buffers,
            },
        ],
    )
}
