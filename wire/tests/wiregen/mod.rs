//! Generators of valid values of the wire formats, for the fuzz targets
//! (docs/fuzzing.md): every value they make must round-trip.

#![allow(dead_code)]

use core::net::Ipv4Addr;
use std::sync::OnceLock;

use capsules_wire::auth::NONCE_LEN;
use capsules_wire::control::*;
use capsules_wire::image::{
    CapsuleImage, IMAGE_NONCE_LEN, ImageKind, ImageNonce, MAX_ARENA_BYTES, PAGE_SIZE, Segment,
    SocketSummary, TaskSummary,
};

use crate::fuzzkit::Rng;

pub fn gen_string(rng: &mut Rng, max_bytes: usize) -> String {
    const CHARS: [char; 10] = ['a', 'Z', '0', '-', '_', ' ', 'é', '日', '🦀', '\n'];
    let target = match rng.below(8) {
        0 => 0,
        1 => rng.below(max_bytes + 1),
        _ => rng.below(max_bytes.min(16) + 1),
    };
    let mut s = String::new();
    loop {
        let c = if rng.chance(3, 4) {
            (b'a' + rng.below(26) as u8) as char
        } else {
            *rng.pick(&CHARS)
        };
        if s.len() + c.len_utf8() > target {
            return s;
        }
        s.push(c);
    }
}

pub fn gen_bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    let len = if rng.chance(1, 8) {
        rng.below(max + 1)
    } else {
        rng.below(max.min(32) + 1)
    };
    rng.bytes(len)
}

pub fn gen_ip(rng: &mut Rng) -> Ipv4Addr {
    Ipv4Addr::from(rng.u32())
}

pub fn gen_batch(rng: &mut Rng) -> PageBatch {
    let page = PAGE_SIZE as u64;
    let pages = if rng.chance(1, 16) {
        rng.below(MAX_BATCH_PAGES + 1)
    } else {
        rng.below(3)
    };
    let end_pages = pages as u64 + rng.below(1 << 18) as u64;
    let end = end_pages * page;
    let mut offsets = Vec::new();
    let mut next_free = 0u64;
    for i in 0..pages {
        let left = pages - i;
        // Leave room for the pages still to place.
        let room = end_pages - next_free - left as u64;
        let skip = rng.below(room.min(64) as usize + 1) as u64;
        let at = next_free + skip;
        offsets.push(at * page);
        next_free = at + 1;
    }
    let next = rng.below(end_pages as usize + 1) as u64 * page;
    PageBatch {
        next,
        end,
        offsets,
        data: rng.bytes(pages * PAGE_SIZE),
    }
}

pub fn gen_request(rng: &mut Rng) -> Request {
    let name = gen_string(rng, 80);
    match rng.below(25) {
        0 => Request::Version,
        1 => Request::Status,
        2 => Request::Shutdown,
        3 => Request::RunCapsule(RunCapsule {
            name,
            program: gen_string(rng, 24),
            args: {
                let most = if rng.chance(1, 8) { MAX_ARGS + 1 } else { 4 };
                (0..rng.below(most))
                    .map(|_| gen_string(rng, MAX_ARG_LEN))
                    .collect()
            },
            locator: gen_ip(rng),
            slot: rng.u32(),
            memory_limit: rng.interesting_u64(),
            epoch: rng.interesting_u64(),
        }),
        4 => Request::ListCapsules,
        5 => Request::KillCapsule { name },
        6 => Request::CapsuleLogs {
            name,
            offset: rng.interesting_u64(),
            max: rng.u32(),
        },
        7 => Request::ListPrograms,
        8 => Request::FreezeCapsule { name },
        9 => Request::ReadImage {
            name,
            offset: rng.interesting_u64(),
            len: rng.u32(),
        },
        10 => Request::ThawCapsule {
            name,
            epoch: rng.interesting_u64(),
        },
        11 => Request::ReleaseCapsule {
            name,
            forward_to: gen_ip(rng),
        },
        12 => Request::RestoreBegin {
            name,
            image_len: rng.interesting_u64(),
        },
        13 => Request::RestoreChunk {
            name,
            offset: rng.interesting_u64(),
            data: gen_bytes(rng, 2048),
        },
        14 => Request::RestoreCommit {
            name,
            epoch: rng.interesting_u64(),
        },
        15 => Request::RestoreAbort { name },
        16 => Request::InspectCapsule { name },
        17 => Request::PrecopyCapsule { name },
        18 => Request::FreezeDelta { name },
        19 => Request::RestoreStage { name },
        20 => Request::ReadPages {
            name,
            from: rng.interesting_u64(),
        },
        21 => Request::StagePages {
            name,
            batch: gen_batch(rng),
        },
        22 if rng.chance(1, 2) => Request::Fence {
            name,
            epoch: rng.interesting_u64(),
        },
        22 => Request::HoldTraffic {
            locator: gen_ip(rng),
        },
        23 => Request::Fence {
            name,
            epoch: rng.interesting_u64(),
        },
        _ => Request::ReleaseTraffic {
            locator: gen_ip(rng),
        },
    }
}

pub fn gen_state(rng: &mut Rng) -> CapsuleState {
    match rng.below(6) {
        0 => CapsuleState::Running,
        1 => CapsuleState::Exited,
        2 => CapsuleState::Faulted {
            reason: gen_string(rng, 64),
        },
        3 => CapsuleState::Killed,
        4 => CapsuleState::Frozen,
        _ => CapsuleState::Migrated,
    }
}

pub fn gen_info(rng: &mut Rng) -> CapsuleInfo {
    CapsuleInfo {
        name: gen_string(rng, 32),
        program: gen_string(rng, 16),
        locator: gen_ip(rng),
        slot: rng.u32(),
        state: gen_state(rng),
        tasks: rng.u32(),
        memory_bytes: rng.interesting_u64(),
        memory_limit: rng.interesting_u64(),
        sockets: rng.u32(),
        uptime_ns: rng.interesting_u64(),
        epoch: rng.interesting_u64(),
    }
}

pub fn gen_task(rng: &mut Rng) -> TaskSummary {
    TaskSummary {
        id: rng.u32(),
        name: gen_string(rng, 16),
        state: gen_string(rng, 16),
        rip: rng.interesting_u64(),
        rsp: rng.interesting_u64(),
    }
}

pub fn gen_socket(rng: &mut Rng) -> SocketSummary {
    SocketSummary {
        protocol: gen_string(rng, 4),
        local: gen_string(rng, 21),
        remote: gen_string(rng, 21),
        state: gen_string(rng, 12),
        send_queue: rng.u32(),
        recv_queue: rng.u32(),
    }
}

pub const ERROR_CODES: [ErrorCode; 11] = [
    ErrorCode::Malformed,
    ErrorCode::Unauthenticated,
    ErrorCode::UnknownRequest,
    ErrorCode::Oversized,
    ErrorCode::UnsupportedVersion,
    ErrorCode::BadSequence,
    ErrorCode::Internal,
    ErrorCode::NotFound,
    ErrorCode::AlreadyExists,
    ErrorCode::LimitReached,
    ErrorCode::InvalidArgument,
];

pub fn gen_response(rng: &mut Rng) -> Response {
    let few = |rng: &mut Rng| {
        if rng.chance(1, 16) {
            rng.below(40)
        } else {
            rng.below(4)
        }
    };
    match rng.below(14) {
        0 => Response::Version {
            protocol_version: rng.u16(),
            build_id: gen_bytes(rng, 64),
            vm_name: gen_string(rng, 32),
        },
        1 => gen_status(rng),
        2 => Response::ShuttingDown,
        3 => Response::CapsuleStarted(gen_info(rng)),
        4 => Response::Capsules((0..few(rng)).map(|_| gen_info(rng)).collect()),
        5 => Response::Killed,
        6 => Response::Logs {
            data: gen_bytes(rng, 4096),
            next_offset: rng.interesting_u64(),
        },
        7 => Response::Programs(
            (0..few(rng))
                .map(|_| ProgramInfo {
                    name: gen_string(rng, 16),
                    description: gen_string(rng, 64),
                })
                .collect(),
        ),
        8 => Response::Frozen {
            image_len: rng.interesting_u64(),
        },
        9 => Response::ImageChunk {
            data: gen_bytes(rng, 4096),
        },
        10 => Response::Done,
        11 => Response::Pages(gen_batch(rng)),
        12 => Response::Inspection {
            tasks: (0..few(rng)).map(|_| gen_task(rng)).collect(),
            sockets: (0..few(rng)).map(|_| gen_socket(rng)).collect(),
        },
        _ => Response::Error {
            code: *rng.pick(&ERROR_CODES),
            message: gen_string(rng, 200),
        },
    }
}

/// A `Status` reply with random counters. Built by decoding, since it is
/// all `u64` fields and their number grows with the counters a VM reports.
/// The most fields that decode: a trailing field may be optional (for
/// older kernels), and every field should be exercised.
pub fn gen_status(rng: &mut Rng) -> Response {
    static FIELDS: OnceLock<usize> = OnceLock::new();
    let fields = *FIELDS.get_or_init(|| {
        (1..256)
            .rev()
            .find(|n| {
                let mut bytes = vec![STATUS_KIND];
                bytes.resize(1 + 8 * n, 0);
                Response::decode(&bytes).is_ok()
            })
            .expect("a Status reply of some number of u64 fields")
    });
    let mut bytes = vec![STATUS_KIND];
    for _ in 0..fields {
        bytes.extend_from_slice(&rng.interesting_u64().to_le_bytes());
    }
    let status = Response::decode(&bytes).expect("status");
    assert!(matches!(status, Response::Status(_)));
    status
}

/// The kind byte of a `Status` reply (docs/control-protocol.md).
pub const STATUS_KIND: u8 = 2;

pub fn gen_hello(rng: &mut Rng) -> Hello {
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&rng.bytes(NONCE_LEN));
    Hello {
        protocol_version: if rng.chance(7, 8) {
            PROTOCOL_VERSION
        } else {
            rng.u16()
        },
        build_id: gen_bytes(rng, 40),
        vm_name: gen_string(rng, 32),
        nonce,
    }
}

/// A capsule image whose layout is sound: a few runs of pages, ordered and
/// inside the arena; a full image has the arena's first page.
pub fn gen_image(rng: &mut Rng) -> CapsuleImage {
    let kind = *rng.pick(&[ImageKind::Full, ImageKind::Base, ImageKind::Delta]);
    let arena_pages = if rng.chance(1, 16) {
        (MAX_ARENA_BYTES / PAGE_SIZE as u64) - rng.below(4) as u64
    } else {
        1 + rng.below(64) as u64
    };
    // A few runs of pages, ordered and inside the arena; a full image
    // always has the arena's first page.
    let mut segments = Vec::new();
    let mut next_free = 0u64;
    let runs = if kind == ImageKind::Base {
        0
    } else {
        rng.below(3) + usize::from(kind == ImageKind::Full)
    };
    for i in 0..runs {
        if next_free >= arena_pages {
            break;
        }
        let start = if i == 0 && kind == ImageKind::Full {
            0
        } else {
            next_free + rng.below((arena_pages - next_free).min(8) as usize) as u64
        };
        let left = arena_pages - start;
        let len = if rng.chance(1, 8) {
            1 + rng.below(left.min(3) as usize) as u64
        } else {
            1
        };
        let mut data = vec![0u8; (len as usize) * PAGE_SIZE];
        for _ in 0..8 {
            let at = rng.below(data.len());
            data[at] = rng.u8();
        }
        segments.push(Segment {
            offset: start * PAGE_SIZE as u64,
            data,
        });
        next_free = start + len + 1;
    }
    CapsuleImage {
        kind,
        build_id: gen_bytes(rng, 64),
        name: gen_string(rng, 32),
        program: gen_string(rng, 16),
        args: {
            let most = if rng.chance(1, 16) { 64 } else { 4 };
            (0..rng.below(most + 1))
                .map(|_| gen_string(rng, 40))
                .collect()
        },
        locator: gen_ip(rng),
        slot: rng.u32(),
        epoch: rng.interesting_u64(),
        memory_limit: rng.interesting_u64(),
        clock_ns: rng.interesting_u64(),
        arena_len: arena_pages * PAGE_SIZE as u64,
        segments,
        root: rng.interesting_u64(),
        log_written: rng.interesting_u64(),
        log_tail: gen_bytes(rng, 256),
        tasks: (0..rng.below(4)).map(|_| gen_task(rng)).collect(),
        sockets: (0..rng.below(4)).map(|_| gen_socket(rng)).collect(),
    }
}

pub fn gen_nonce(rng: &mut Rng) -> ImageNonce {
    rng.bytes(IMAGE_NONCE_LEN).try_into().unwrap()
}
