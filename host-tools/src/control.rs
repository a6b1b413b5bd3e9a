//! Client of a VM's control service (TCP, framed, authenticated; the
//! protocol itself is defined in `capsules_wire::control`). Each connection
//! starts with the server's hello and our client hello, which carries a fresh
//! nonce of ours: answers recorded in any other connection never verify.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use capsules_wire::auth::NONCE_LEN;
use capsules_wire::control::{
    ClientError, ClientSession, FRAME_HEADER_LEN, Hello, MAX_FRAME_LEN, Request, Response, Status,
    frame,
};

/// What a move needs of a control connection to one VM: the real one is
/// [`ControlClient`]; unit tests of the move use a fake VM
/// (`crate::migrate::fake`). `Send`, so that a stream can read from one VM
/// in a thread while writing to another.
pub trait Transport: Send {
    /// Sends one request and returns its verified answer.
    fn call(&mut self, request: &Request) -> Result<Response>;
    /// Sends a request and never reads its answer; the connection is of no
    /// further use.
    fn send_only(&mut self, request: &Request) -> Result<()>;
    /// The request is carried out but its answer is lost: read and thrown
    /// away (fault injection). The connection is of no further use.
    fn lose_answer(&mut self, request: &Request) -> Result<()> {
        self.call(request).map(|_| ())
    }
    /// The kernel build the VM runs (from its hello).
    fn build_id(&self) -> Vec<u8>;
}

impl Transport for ControlClient {
    fn call(&mut self, request: &Request) -> Result<Response> {
        ControlClient::call(self, request)
    }

    fn send_only(&mut self, request: &Request) -> Result<()> {
        ControlClient::send_only(self, request)
    }

    fn build_id(&self) -> Vec<u8> {
        self.hello().build_id.clone()
    }
}

/// One authenticated control connection.
pub struct ControlClient {
    stream: TcpStream,
    session: ClientSession,
    /// Who answers (a VM's name), for error messages.
    peer: Option<String>,
}

/// Reads one frame payload (length prefix checked against the protocol limit).
pub fn read_frame(stream: &mut TcpStream) -> Result<Vec<u8>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header).map_err(|e| {
        let timed_out = matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        );
        match stream.read_timeout() {
            Ok(Some(t)) if timed_out => anyhow!("no answer within {} s", t.as_secs_f64()),
            _ => anyhow::Error::new(e).context("connection closed before a frame arrived"),
        }
    })?;
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        bail!("server sent a frame of {len} bytes, above the limit of {MAX_FRAME_LEN}");
    }
    let mut payload = vec![0u8; len];
    stream
        .read_exact(&mut payload)
        .context("connection closed in the middle of a frame")?;
    Ok(payload)
}

impl ControlClient {
    /// Connects, reads the server's Hello and starts a session with `key`.
    pub fn connect(addr: SocketAddr, key: &[u8], timeout: Duration) -> Result<Self> {
        Self::connect_with(addr, key, timeout, timeout)
    }

    /// Like [`Self::connect`] with separate timeouts for the TCP handshake and
    /// for each read or write (pollers want a short handshake timeout so that
    /// a SYN lost before the guest is up costs little).
    pub fn connect_with(
        addr: SocketAddr,
        key: &[u8],
        connect_timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Self> {
        let mut stream = TcpStream::connect_timeout(&addr, connect_timeout)
            .with_context(|| format!("cannot connect to control port {addr}"))?;
        stream.set_read_timeout(Some(io_timeout))?;
        stream.set_write_timeout(Some(io_timeout))?;
        stream.set_nodelay(true)?;
        let hello = read_frame(&mut stream).context("no Hello from the control service")?;
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| anyhow!("no randomness for a nonce: {e}"))?;
        let session = ClientSession::new(key, &hello, nonce)
            .map_err(|e| anyhow!("bad Hello from {addr}: {e}"))?;
        // Sent at once: the server closes connections that have not proved
        // the key within its handshake deadline.
        stream
            .write_all(&frame(session.client_hello()))
            .context("cannot send the client hello")?;
        Ok(Self {
            stream,
            session,
            peer: None,
        })
    }

    /// Names the peer in the errors of later requests ("vm2 did not answer …").
    pub fn named(mut self, peer: &str) -> Self {
        self.peer = Some(peer.to_string());
        self
    }

    /// The server's hello; its build id and name are authentic once a
    /// call has returned a verified answer (the session key covers them).
    pub fn hello(&self) -> &Hello {
        self.session.hello()
    }

    /// Sends one request and returns the verified response, with the protocol's
    /// own error classes kept for callers that check them.
    pub fn call(&mut self, request: &Request) -> Result<Response> {
        self.try_call(request)?
            .map_err(|e| anyhow!("control request {request:?} refused: {e}"))
    }

    /// Like [`Self::call`], but keeps a protocol-level refusal apart from an
    /// I/O failure: `Ok(Err(_))` is the server's (or MAC check's) verdict.
    pub fn try_call(&mut self, request: &Request) -> Result<Result<Response, ClientError>> {
        let (seq, payload) = self.session.seal(request);
        let exchanged = self
            .stream
            .write_all(&frame(&payload))
            .context("cannot send control request")
            .and_then(|()| read_frame(&mut self.stream));
        let reply = match (exchanged, &self.peer) {
            (Ok(reply), _) => reply,
            (Err(e), Some(peer)) => return Err(e.context(format!("{peer} did not answer"))),
            (Err(e), None) => return Err(e),
        };
        Ok(self.session.open(seq, &reply))
    }

    /// Sends a request and does not wait for its answer (which is then never
    /// read: the connection is of no further use). For the test hook that
    /// loses a commit's answer.
    pub fn send_only(&mut self, request: &Request) -> Result<()> {
        let (_, payload) = self.session.seal(request);
        self.stream
            .write_all(&frame(&payload))
            .context("cannot send control request")
    }

    /// Sends arbitrary bytes (already framed or not) and reads one reply frame,
    /// decoding it as far as an unauthenticated error goes. For tests of the
    /// server's handling of garbage.
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<Result<Response, ClientError>> {
        self.stream.write_all(bytes).context("cannot send bytes")?;
        let reply = read_frame(&mut self.stream)?;
        Ok(match self.session.open(0, &reply) {
            // Garbage is no request of ours: only a refusal can be read.
            Err(ClientError::NotPending(_)) => Err(ClientError::BadServerTag),
            other => other,
        })
    }

    pub fn version(&mut self) -> Result<(u16, Vec<u8>, String)> {
        match self.call(&Request::Version)? {
            Response::Version {
                protocol_version,
                build_id,
                vm_name,
            } => Ok((protocol_version, build_id, vm_name)),
            other => bail!("unexpected answer to Version: {other:?}"),
        }
    }

    pub fn status(&mut self) -> Result<Status> {
        match self.call(&Request::Status)? {
            Response::Status(s) => Ok(s),
            other => bail!("unexpected answer to Status: {other:?}"),
        }
    }

    pub fn shutdown(&mut self) -> Result<()> {
        match self.call(&Request::Shutdown)? {
            Response::ShuttingDown => Ok(()),
            other => bail!("unexpected answer to Shutdown: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsules_wire::control::{ErrorCode, Incoming, ServerSession};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// A one-connection control server on loopback built from the wire crate's
    /// server half, so the client is tested against the real protocol logic.
    /// Everything it sends is also appended to the returned recording.
    fn serve_once(key: [u8; 32]) -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let recording = Arc::new(Mutex::new(Vec::new()));
        let sent = recording.clone();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let send = |s: &mut TcpStream, payload: &[u8]| {
                let bytes = frame(payload);
                sent.lock().unwrap().extend_from_slice(&bytes);
                s.write_all(&bytes).unwrap();
            };
            let mut server = ServerSession::new(&key, [7; 32]);
            let hello = server.hello(b"\x01\x02", "vm0");
            send(&mut s, &hello);
            while let Ok(payload) = read_frame(&mut s) {
                let reply = match server.handle(&payload) {
                    Incoming::Opened => continue,
                    Incoming::Request { seq, request } => {
                        let resp = match request {
                            Request::Version => Response::Version {
                                protocol_version: 1,
                                build_id: vec![1, 2],
                                vm_name: "vm0".into(),
                            },
                            Request::Status => Response::error(ErrorCode::Internal, "x"),
                            Request::Shutdown => Response::ShuttingDown,
                            _ => Response::error(ErrorCode::UnknownRequest, "not in this fake"),
                        };
                        server.reply(seq, &resp)
                    }
                    Incoming::Refused { reply, .. } => reply,
                    // The kernel closes here; the fake keeps reading so that
                    // the client surely reads the refusal first.
                    Incoming::HandshakeFailed { reply, .. } => reply,
                };
                send(&mut s, &reply);
            }
        });
        (addr, recording)
    }

    #[test]
    fn talks_to_a_server_and_sees_refusals() {
        let key = [5u8; 32];
        let (addr, _) = serve_once(key);
        let mut c = ControlClient::connect(addr, &key, Duration::from_secs(5)).unwrap();
        assert_eq!(c.hello().vm_name, "vm0");
        assert_eq!(c.version().unwrap(), (1, vec![1, 2], "vm0".into()));
        assert!(c.status().is_err());
        let garbage = c.send_raw(&frame(b"xx")).unwrap();
        assert!(matches!(
            garbage,
            Err(ClientError::Refused {
                code: ErrorCode::Malformed,
                ..
            })
        ));
        c.shutdown().unwrap();

        // The wrong key fails at the client hello; the client reads why.
        let (addr, _) = serve_once(key);
        let mut intruder =
            ControlClient::connect(addr, &[6u8; 32], Duration::from_secs(5)).unwrap();
        assert!(matches!(
            intruder.try_call(&Request::Version).unwrap(),
            Err(ClientError::Refused {
                code: ErrorCode::Unauthenticated,
                ..
            })
        ));
    }

    /// A fake VM that plays back bytes recorded from a real session: its
    /// hello (server nonce and all) and its authentic answers.
    fn replay_server(recorded: Vec<u8>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&recorded).unwrap();
            // Read the client's frames until it gives up.
            while read_frame(&mut s).is_ok() {}
        });
        addr
    }

    /// The attack that protocol version 3 closes: a session recorded on the
    /// wire is played back to capsulectl, which would have taken the
    /// recorded answers (say, "the capsule runs here") as today's.
    #[test]
    fn a_recorded_session_played_back_is_rejected() {
        let key = [5u8; 32];
        let (addr, recording) = serve_once(key);
        let mut c = ControlClient::connect(addr, &key, Duration::from_secs(5)).unwrap();
        assert_eq!(c.version().unwrap(), (1, vec![1, 2], "vm0".into()));
        drop(c);
        let recorded = recording.lock().unwrap().clone();

        let addr = replay_server(recorded);
        let mut victim = ControlClient::connect(addr, &key, Duration::from_secs(5)).unwrap();
        assert_eq!(
            victim.try_call(&Request::Version).unwrap(),
            Err(ClientError::BadServerTag),
            "a recorded answer was accepted"
        );
    }
}
