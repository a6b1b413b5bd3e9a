//! `kv`: an in-memory key-value server that standard Redis clients can use
//! (RESP2, strings only).
//!
//! A [`Store`] is shared by all connections of the capsule; each connection
//! owns a [`Session`] that turns received bytes into replies. Commands are
//! executed as soon as they are complete, so pipelined batches are answered
//! in order within one `feed` call.

mod commands;
mod glob;
mod resp;
mod store;

use alloc::string::String;
use alloc::vec::Vec;

pub use crate::Flow;
pub use store::Store;

/// The conventional Redis port.
pub const DEFAULT_PORT: u16 = 6379;

/// Parses `[--port N]`.
pub fn parse_args(args: &[&str]) -> Result<u16, String> {
    crate::args::parse_port_args("kv", args, DEFAULT_PORT)
}

/// What `INFO` reports about the capsule; supplied by the kernel side.
#[derive(Debug, Clone, Copy)]
pub struct ServerInfo<'a> {
    pub capsule: &'a str,
    pub locator: &'a str,
    pub vm: &'a str,
    pub uptime_ms: u64,
    pub connected_clients: u32,
    /// Commands processed by all sessions, as known to the caller.
    pub total_commands: u64,
}

/// Above this, an idle input buffer gives its memory back, so one huge
/// request does not pin its size for the rest of the connection.
const RETAINED_BUFFER: usize = 64 << 10;

/// Per-connection protocol state.
#[derive(Debug, Default)]
pub struct Session {
    input: Vec<u8>,
    parser: resp::Parser,
    client_name: Option<Vec<u8>>,
    commands_executed: u64,
    closed: bool,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes, executes every complete command (pipelining),
    /// and appends the replies to `out`.
    ///
    /// Returns [`Flow::Close`] after `QUIT` (its `+OK` is in `out`) or after a
    /// protocol error that leaves the stream unparsable (then `out` ends with
    /// `-ERR Protocol error: ...`); later calls ignore their input and return
    /// `Close` again. `INFO` reports `info.total_commands` plus the commands
    /// this call executed, so the caller should fold
    /// [`Session::commands_executed`] into its total between calls.
    pub fn feed(
        &mut self,
        input: &[u8],
        store: &mut Store,
        now_ms: u64,
        info: &ServerInfo,
        out: &mut Vec<u8>,
    ) -> Flow {
        if self.closed {
            return Flow::Close;
        }
        self.input.extend_from_slice(input);
        let mut commands_in_call = 0;
        let flow = loop {
            let source = match self.parser.parse(&self.input) {
                Ok(Some(source)) => source,
                Ok(None) => break Flow::Continue,
                Err(error) => {
                    error.write_reply(out);
                    break Flow::Close;
                }
            };
            commands_in_call += 1;
            self.commands_executed += 1;
            let args = commands::Args {
                src: match source {
                    resp::Source::Input => &self.input,
                    resp::Source::Inline => self.parser.inline_args(),
                },
                ranges: self.parser.args(),
            };
            let mut context = commands::Context {
                store,
                now_ms,
                info,
                client_name: &mut self.client_name,
                commands_in_call,
            };
            let flow = commands::execute(&args, &mut context, out);
            self.parser.finish();
            if flow == Flow::Close {
                break Flow::Close;
            }
        };
        if flow == Flow::Close {
            self.closed = true;
            self.input = Vec::new();
            return flow;
        }
        self.parser.compact(&mut self.input);
        if self.input.capacity() > RETAINED_BUFFER && self.input.len() < RETAINED_BUFFER / 4 {
            self.input.shrink_to(RETAINED_BUFFER / 4);
        }
        flow
    }

    /// Commands answered by this session so far, rejected ones included.
    pub fn commands_executed(&self) -> u64 {
        self.commands_executed
    }

    /// The name set with `CLIENT SETNAME`, if any.
    pub fn client_name(&self) -> Option<&[u8]> {
        self.client_name.as_deref()
    }
}

#[cfg(test)]
mod tests;
