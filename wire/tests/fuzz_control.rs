//! Bounded, seeded fuzzing of the control protocol (docs/fuzzing.md): request,
//! response, hello and envelope decoding, the server and client sessions, and
//! the frame splitter. Inputs are valid messages from the real encoders,
//! mutations of them, and random bytes.
//!
//! Properties: no input panics; every generated value round-trips; every
//! accepted input is the canonical encoding of what it decoded to (so it
//! re-encodes to itself and decodes equal again); a decoder allocates at
//! most a small multiple of its input; a changed request or response is
//! never accepted as authentic, and a refused one changes nothing.

mod fuzzkit;
mod wiregen;

use capsules_wire::auth::NONCE_LEN;
use capsules_wire::control::*;
use fuzzkit::{Rng, Stats, assert_bounded, guarded, inputs, measure, mutate};
use wiregen::*;

/// A decoder may allocate this many times its input, plus [`SLACK`] bytes.
const ALLOC_FACTOR: usize = 8;
const SLACK: usize = 1024;

const KEY: [u8; 32] = [0x42; 32];

const DICTIONARY: &[&[u8]] = &[
    b"CPSL",
    &[2, 0],
    &[0, 0, 0, 0],
    &[0xff, 0xff, 0xff, 0xff],
    &[0, 0, 1, 0],
    &[0, 16, 0, 0],
    &[0xff],
    &[13],
    &[24],
    &[198, 18, 0, 1],
    b"\xc3\xa9",
    b"\xed\xa0\x80",
    b"\xf0\x9f\xa6\x80",
];

// ---------------------------------------------------------------------------
// Shared driver: generated (round trip), mutated, and random inputs.

/// Where the `i`-th input of a target comes from.
enum Source {
    Generated,
    Mutated,
    Random,
}

fn source(rng: &mut Rng) -> Source {
    match rng.below(10) {
        0 | 1 => Source::Generated,
        2..=8 => Source::Mutated,
        _ => Source::Random,
    }
}

/// Runs a byte-level target: `generate` makes a valid encoding (and checks
/// its round trip), `check` decodes an input and checks the properties,
/// returning whether the input was accepted.
fn run_target(
    target: &'static str,
    default_inputs: usize,
    generate: impl Fn(&mut Rng) -> Vec<u8>,
    check: impl Fn(&[u8]) -> bool,
) {
    let mut rng = fuzzkit::Rng::for_target(target);
    let mut stats = Stats::new(target);
    let mut pool: Vec<Vec<u8>> = (0..64).map(|_| generate(&mut rng)).collect();
    for i in 0..inputs(default_inputs) {
        let input = match source(&mut rng) {
            Source::Generated => {
                let fresh = generate(&mut rng);
                pool[i % 64] = fresh.clone();
                fresh
            }
            Source::Mutated => {
                let base = rng.pick(&pool).clone();
                mutate(&mut rng, &base, DICTIONARY, &pool)
            }
            Source::Random => rng.random_input(256),
        };
        let accepted = guarded(target, &input, || check(&input));
        stats.input(accepted);
    }
}

// ---------------------------------------------------------------------------
// Targets.

#[test]
fn fuzz_request_decoding() {
    run_target(
        "control-request",
        100_000,
        |rng| {
            let request = gen_request(rng);
            let bytes = request.encode();
            assert_eq!(Request::decode(&bytes), Ok(request), "round trip");
            bytes
        },
        |input| {
            let (decoded, allocated) = measure(|| Request::decode(input));
            assert_bounded("control-request", input, allocated, ALLOC_FACTOR, SLACK);
            match decoded {
                Ok(request) => {
                    let again = request.encode();
                    assert_eq!(again, input, "accepted input is not canonical");
                    assert_eq!(Request::decode(&again), Ok(request));
                    true
                }
                Err(_) => false,
            }
        },
    );
}

#[test]
fn fuzz_response_decoding() {
    run_target(
        "control-response",
        100_000,
        |rng| {
            let response = gen_response(rng);
            let bytes = response.encode();
            assert_eq!(Response::decode(&bytes), Ok(response), "round trip");
            bytes
        },
        |input| {
            let (decoded, allocated) = measure(|| Response::decode(input));
            assert_bounded("control-response", input, allocated, ALLOC_FACTOR, SLACK);
            match decoded {
                Ok(response) => {
                    let again = response.encode();
                    // The one accepted short form: a status from an older
                    // kernel, without its last field (`arp_conflicts`),
                    // comes back with that field as zero.
                    let old_status = matches!(response, Response::Status(_))
                        && again.len() == input.len() + 8
                        && again.starts_with(input)
                        && again.ends_with(&[0; 8]);
                    if !old_status {
                        assert_eq!(again, input, "accepted input is not canonical");
                    }
                    assert_eq!(Response::decode(&again), Ok(response));
                    true
                }
                Err(_) => false,
            }
        },
    );
}

#[test]
fn fuzz_hello_and_envelope_decoding() {
    run_target(
        "control-hello",
        100_000,
        |rng| {
            let hello = gen_hello(rng);
            let bytes = hello.encode();
            assert_eq!(Hello::decode(&bytes), Ok(hello), "round trip");
            bytes
        },
        |input| {
            let (decoded, allocated) = measure(|| Hello::decode(input));
            assert_bounded("control-hello", input, allocated, ALLOC_FACTOR, SLACK);
            let _ = ClientSession::new(&KEY, input, [7; NONCE_LEN]);
            let _ = ClientHello::decode(input);
            match decoded {
                Ok(hello) => {
                    assert_eq!(hello.encode(), input, "accepted hello is not canonical");
                    true
                }
                Err(_) => false,
            }
        },
    );
    run_target(
        "control-envelope",
        100_000,
        |rng| {
            let env = Envelope {
                protocol_version: rng.u16(),
                seq: rng.interesting_u64(),
                body: gen_bytes(rng, 512),
                tag: rng.bytes(16).try_into().unwrap(),
            };
            let bytes = env.encode();
            assert_eq!(Envelope::decode(&bytes), Ok(env), "round trip");
            bytes
        },
        |input| {
            let (decoded, allocated) = measure(|| Envelope::decode(input));
            assert_bounded("control-envelope", input, allocated, ALLOC_FACTOR, SLACK);
            match decoded {
                Ok(env) => {
                    assert_eq!(env.encode(), input, "accepted envelope is not canonical");
                    true
                }
                Err(_) => false,
            }
        },
    );
}

/// A server and a client session shake hands and exchange generated
/// requests and responses; in between, each side is handed changed frames:
/// as they arrive on the wire (the MACs must refuse them), and as bodies
/// sealed with the session key (the decoders behind the MAC then see them).
#[test]
fn fuzz_sessions() {
    let target = "control-session";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    let mut pool: Vec<Vec<u8>> = (0..32).map(|_| gen_request(&mut rng).encode()).collect();
    let total = inputs(60_000);
    let mut done = 0;
    while done < total {
        let nonce: [u8; NONCE_LEN] = rng.bytes(NONCE_LEN).try_into().unwrap();
        let client_nonce: [u8; NONCE_LEN] = rng.bytes(NONCE_LEN).try_into().unwrap();
        let mut server = ServerSession::new(&KEY, nonce);
        let hello = server.hello(b"build", "vm");
        let mut client = ClientSession::new(&KEY, &hello, client_nonce).expect("own hello");
        // A changed client hello fails the handshake (on a twin server).
        let mut twin = ServerSession::new(&KEY, nonce);
        assert_eq!(twin.hello(b"build", "vm"), hello);
        let changed = mutate(&mut rng, client.client_hello(), DICTIONARY, &pool);
        match guarded(target, &changed, || twin.handle(&changed)) {
            Incoming::Opened => assert_eq!(changed, client.client_hello()),
            Incoming::HandshakeFailed { .. } => {
                assert!(!twin.is_open());
                let (_, payload) = client.seal(&Request::Status);
                assert!(
                    matches!(twin.handle(&payload), Incoming::HandshakeFailed { .. }),
                    "a failed handshake let a request through"
                );
            }
            other => panic!("a client hello was answered with {other:?}"),
        }
        assert_eq!(server.handle(client.client_hello()), Incoming::Opened);
        for _ in 0..50 {
            done += 1;
            let request = gen_request(&mut rng);
            match rng.below(3) {
                // A changed frame on the wire is refused, and the original
                // still goes through afterwards: a refusal changes nothing.
                0 => {
                    let (seq, payload) = client.seal(&request);
                    let changed = mutate(&mut rng, &payload, DICTIONARY, &pool);
                    let outcome = guarded(target, &changed, || server.handle(&changed));
                    match outcome {
                        Incoming::Request { .. } => {
                            assert_eq!(changed, payload, "a changed request was accepted")
                        }
                        Incoming::Refused { reply, code } => {
                            let env = Envelope::decode(&reply).expect("refusal is an envelope");
                            assert!(matches!(
                                Response::decode(&env.body),
                                Ok(Response::Error { code: c, .. }) if c == code
                            ));
                            // The client reads it as a refusal, never as an answer.
                            assert!(client.open(seq, &reply).is_err());
                            let again = server.handle(&payload);
                            assert!(
                                matches!(&again, Incoming::Request { seq: s, request: r } if *s == seq && *r == request),
                                "the original was refused after a changed copy: {again:?}"
                            );
                        }
                        other => panic!("a request frame was answered with {other:?}"),
                    }
                    stats.input(false);
                }
                // A body changed before sealing: authentic, maybe malformed.
                1 => {
                    let body = mutate(&mut rng, &request.encode(), DICTIONARY, &pool);
                    let (seq, payload) = client.seal_body(body.clone());
                    let outcome = guarded(target, &body, || server.handle(&payload));
                    let accepted = match (outcome, Request::decode(&body)) {
                        (Incoming::Request { seq: s, request: r }, Ok(decoded)) => {
                            assert_eq!((s, r), (seq, decoded));
                            true
                        }
                        (Incoming::Refused { reply, code }, Err(_)) => {
                            assert!(matches!(
                                code,
                                ErrorCode::Malformed | ErrorCode::UnknownRequest
                            ));
                            // Signed: the client gets the error as an answer.
                            match client.open(seq, &reply) {
                                Ok(Response::Error { code: c, .. }) => assert_eq!(c, code),
                                other => panic!("signed refusal read as {other:?}"),
                            }
                            false
                        }
                        (outcome, decoded) => {
                            panic!("session and decoder disagree: {outcome:?} vs {decoded:?}")
                        }
                    };
                    pool[rng.below(32)] = body;
                    stats.input(accepted);
                }
                // The honest exchange, then changed answers for the client.
                _ => {
                    let (seq, payload) = client.seal(&request);
                    match server.handle(&payload) {
                        Incoming::Request { seq: s, request: r } => {
                            assert_eq!((s, &r), (seq, &request))
                        }
                        other => panic!("honest request refused: {other:?}"),
                    }
                    let response = gen_response(&mut rng);
                    let reply = server.reply(seq, &response);
                    assert_eq!(client.open(seq, &reply), Ok(response.clone()));
                    let changed = mutate(&mut rng, &reply, DICTIONARY, &pool);
                    let opened = guarded(target, &changed, || client.open(seq, &changed));
                    if changed != reply {
                        assert!(
                            opened.is_err(),
                            "a changed response was accepted: {} for {}",
                            fuzzkit::hex(&changed),
                            fuzzkit::hex(&reply)
                        );
                    }
                    // A body sealed by the key holder but malformed is an error.
                    let body = mutate(&mut rng, &response.encode(), DICTIONARY, &pool);
                    let sealed = server.reply_body(seq, body.clone());
                    let opened = guarded(target, &body, || client.open(seq, &sealed));
                    assert_eq!(opened.ok(), Response::decode(&body).ok());
                    stats.input(true);
                }
            }
        }
    }
}

/// Streams of frames cut at random points come out as the same payloads; a
/// corrupted length prefix either waits, yields, or fails for good, and the
/// decoder never buffers more than one frame and one push.
#[test]
fn fuzz_frame_decoder() {
    let target = "control-frames";
    let mut rng = Rng::for_target(target);
    let mut stats = Stats::new(target);
    for _ in 0..inputs(40_000) {
        let payloads: Vec<Vec<u8>> = (0..rng.range(1, 6))
            .map(|_| {
                if rng.chance(1, 50) {
                    let len = rng.below(MAX_FRAME_LEN + 1);
                    rng.bytes(len)
                } else {
                    gen_bytes(&mut rng, 600)
                }
            })
            .collect();
        let mut stream: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
        let corrupt = rng.chance(1, 3);
        if corrupt {
            stream = mutate(&mut rng, &stream, DICTIONARY, &[]);
        }
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        let mut failed = false;
        let mut at = 0;
        guarded(target, &stream, || {
            while at < stream.len() {
                let n = rng.range(1, (stream.len() - at).min(2000));
                decoder.push(&stream[at..at + n]);
                at += n;
                loop {
                    match decoder.next_frame() {
                        Ok(Some(payload)) => got.push(payload),
                        Ok(None) => break,
                        Err(e) => {
                            assert!(e.declared > MAX_FRAME_LEN);
                            failed = true;
                            break;
                        }
                    }
                }
                assert!(
                    decoder.buffered() <= FRAME_HEADER_LEN + MAX_FRAME_LEN + n,
                    "decoder holds {} bytes",
                    decoder.buffered()
                );
                if failed {
                    assert!(decoder.next_frame().is_err(), "a failed decoder recovered");
                    assert_eq!(decoder.buffered(), 0);
                }
            }
        });
        if !corrupt {
            assert!(!failed);
            assert_eq!(got, payloads, "frames changed on the way");
            assert_eq!(decoder.buffered(), 0);
        }
        stats.input(!failed);
    }
}
