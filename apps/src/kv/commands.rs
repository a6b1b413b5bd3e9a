//! Command execution: one handler per command, replies in RESP2.

use super::resp::{self, parse_i64, push_decimal};
use super::{ServerInfo, Store, glob};
use crate::Flow;
use alloc::vec::Vec;
use core::ops::Range;

/// The arguments of one command, borrowed from wherever the parser put them.
pub(crate) struct Args<'a> {
    pub src: &'a [u8],
    pub ranges: &'a [Range<usize>],
}

impl<'a> Args<'a> {
    fn len(&self) -> usize {
        self.ranges.len()
    }

    /// The argument at `index`, or empty past the end (arity is checked
    /// before handlers run, so that never decides a reply).
    fn get(&self, index: usize) -> &'a [u8] {
        self.ranges
            .get(index)
            .and_then(|r| self.src.get(r.clone()))
            .unwrap_or(&[])
    }

    fn iter_from(&self, first: usize) -> impl Iterator<Item = &'a [u8]> + '_ {
        (first..self.len()).map(|i| self.get(i))
    }
}

/// Everything a handler may touch besides its arguments.
pub(crate) struct Context<'a, 'i> {
    pub store: &'a mut Store,
    pub now_ms: u64,
    pub info: &'a ServerInfo<'i>,
    pub client_name: &'a mut Option<Vec<u8>>,
    /// Commands this session ran in the current `feed` call, this one
    /// included; the caller's total does not know about them yet.
    pub commands_in_call: u64,
}

type Handler = fn(&Args<'_>, &mut Context<'_, '_>, &mut Vec<u8>) -> Flow;

struct Command {
    name: &'static str,
    /// Redis convention: N means exactly N arguments (name included), -N at least N.
    arity: i32,
    handler: Handler,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "get",
        arity: 2,
        handler: get,
    },
    Command {
        name: "set",
        arity: -3,
        handler: set,
    },
    Command {
        name: "ping",
        arity: -1,
        handler: ping,
    },
    Command {
        name: "echo",
        arity: 2,
        handler: echo,
    },
    Command {
        name: "del",
        arity: -2,
        handler: del,
    },
    Command {
        name: "exists",
        arity: -2,
        handler: exists,
    },
    Command {
        name: "incr",
        arity: 2,
        handler: incr,
    },
    Command {
        name: "decr",
        arity: 2,
        handler: decr,
    },
    Command {
        name: "incrby",
        arity: 3,
        handler: incrby,
    },
    Command {
        name: "decrby",
        arity: 3,
        handler: decrby,
    },
    Command {
        name: "mget",
        arity: -2,
        handler: mget,
    },
    Command {
        name: "mset",
        arity: -3,
        handler: mset,
    },
    Command {
        name: "append",
        arity: 3,
        handler: append,
    },
    Command {
        name: "strlen",
        arity: 2,
        handler: strlen,
    },
    Command {
        name: "keys",
        arity: 2,
        handler: keys,
    },
    Command {
        name: "dbsize",
        arity: 1,
        handler: dbsize,
    },
    Command {
        name: "flushall",
        arity: -1,
        handler: flushall,
    },
    Command {
        name: "flushdb",
        arity: -1,
        handler: flushall,
    },
    Command {
        name: "expire",
        arity: -3,
        handler: expire,
    },
    Command {
        name: "pexpire",
        arity: -3,
        handler: pexpire,
    },
    Command {
        name: "persist",
        arity: 2,
        handler: persist,
    },
    Command {
        name: "ttl",
        arity: 2,
        handler: ttl,
    },
    Command {
        name: "pttl",
        arity: 2,
        handler: pttl,
    },
    Command {
        name: "info",
        arity: -1,
        handler: info,
    },
    Command {
        name: "select",
        arity: 2,
        handler: select,
    },
    Command {
        name: "client",
        arity: -2,
        handler: client,
    },
    Command {
        name: "command",
        arity: -1,
        handler: command,
    },
    Command {
        name: "quit",
        arity: -1,
        handler: quit,
    },
];

const NOT_AN_INTEGER: &[u8] = b"ERR value is not an integer or out of range";
const SYNTAX_ERROR: &[u8] = b"ERR syntax error";

/// Runs one command and appends its reply.
pub(crate) fn execute(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let name = args.get(0);
    let Some(command) = COMMANDS
        .iter()
        .find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
    else {
        unknown_command(args, out);
        return Flow::Continue;
    };
    let count = args.len() as i64;
    let arity = i64::from(command.arity);
    if (arity > 0 && count != arity) || (arity < 0 && count < -arity) {
        wrong_arity(command.name.as_bytes(), out);
        return Flow::Continue;
    }
    (command.handler)(args, ctx, out)
}

/// Redis 7 wording, including its 128-byte truncation of what it echoes.
fn unknown_command(args: &Args<'_>, out: &mut Vec<u8>) {
    let mut message = Vec::with_capacity(96);
    message.extend_from_slice(b"ERR unknown command '");
    let name = args.get(0);
    message.extend_from_slice(&name[..name.len().min(128)]);
    message.extend_from_slice(b"', with args beginning with: ");
    let mut echoed = 0;
    for arg in args.iter_from(1) {
        if echoed >= 128 {
            break;
        }
        let shown = &arg[..arg.len().min(128 - echoed)];
        message.push(b'\'');
        message.extend_from_slice(shown);
        message.extend_from_slice(b"' ");
        echoed += shown.len() + 3;
    }
    resp::error(out, &message);
}

fn wrong_arity(name: &[u8], out: &mut Vec<u8>) {
    let mut message = Vec::with_capacity(64);
    message.extend_from_slice(b"ERR wrong number of arguments for '");
    message.extend_from_slice(name);
    message.extend_from_slice(b"' command");
    resp::error(out, &message);
}

fn ping(args: &Args<'_>, _: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    match args.len() {
        1 => resp::simple(out, b"PONG"),
        2 => resp::bulk(out, args.get(1)),
        _ => wrong_arity(b"ping", out),
    }
    Flow::Continue
}

fn echo(args: &Args<'_>, _: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    resp::bulk(out, args.get(1));
    Flow::Continue
}

fn get(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    match ctx.store.get(args.get(1), ctx.now_ms) {
        Some(entry) => resp::bulk(out, &entry.value),
        None => resp::null(out),
    }
    Flow::Continue
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Condition {
    Always,
    IfMissing,
    IfExists,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ExpiryOption {
    Clear,
    Keep,
    RelativeSeconds,
    RelativeMillis,
    AtSeconds,
    AtMillis,
}

fn set(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let mut condition = Condition::Always;
    let mut return_old = false;
    let mut expiry = ExpiryOption::Clear;
    let mut expiry_arg: &[u8] = &[];
    let mut i = 3;
    // Mirrors Redis: an option may repeat, but conflicting ones are a syntax error.
    while i < args.len() {
        let option = args.get(i);
        let has_value = i + 1 < args.len();
        let timed = |o: ExpiryOption| expiry == ExpiryOption::Clear || expiry == o;
        if option.eq_ignore_ascii_case(b"nx") && condition != Condition::IfExists {
            condition = Condition::IfMissing;
        } else if option.eq_ignore_ascii_case(b"xx") && condition != Condition::IfMissing {
            condition = Condition::IfExists;
        } else if option.eq_ignore_ascii_case(b"get") {
            return_old = true;
        } else if option.eq_ignore_ascii_case(b"keepttl") && timed(ExpiryOption::Keep) {
            expiry = ExpiryOption::Keep;
        } else if let Some(kind) = [
            (&b"ex"[..], ExpiryOption::RelativeSeconds),
            (b"px", ExpiryOption::RelativeMillis),
            (b"exat", ExpiryOption::AtSeconds),
            (b"pxat", ExpiryOption::AtMillis),
        ]
        .iter()
        .find(|(word, _)| option.eq_ignore_ascii_case(word))
        .map(|&(_, kind)| kind)
        .filter(|&kind| has_value && timed(kind))
        {
            expiry = kind;
            expiry_arg = args.get(i + 1);
            i += 1;
        } else {
            resp::error(out, SYNTAX_ERROR);
            return Flow::Continue;
        }
        i += 1;
    }

    let expires_at_ms = match expiry {
        ExpiryOption::Clear | ExpiryOption::Keep => None,
        timed => match deadline(expiry_arg, timed, ctx.now_ms) {
            Ok(Some(at)) => Some(at),
            Ok(None) => {
                resp::error(out, b"ERR invalid expire time in 'set' command");
                return Flow::Continue;
            }
            Err(()) => {
                resp::error(out, NOT_AN_INTEGER);
                return Flow::Continue;
            }
        },
    };

    let key = args.get(1);
    let existing = ctx.store.get(key, ctx.now_ms);
    let exists = existing.is_some();
    if return_old {
        match existing {
            Some(entry) => resp::bulk(out, &entry.value),
            None => resp::null(out),
        }
    }
    let kept_expiry = existing.and_then(|e| e.expires_at_ms);
    let allowed = match condition {
        Condition::Always => true,
        Condition::IfMissing => !exists,
        Condition::IfExists => exists,
    };
    if allowed {
        let expires_at_ms = if expiry == ExpiryOption::Keep {
            kept_expiry
        } else {
            expires_at_ms
        };
        ctx.store.set(key, args.get(2), expires_at_ms);
    }
    if !return_old {
        if allowed {
            resp::simple(out, b"OK");
        } else {
            resp::null(out);
        }
    }
    Flow::Continue
}

/// Converts an expiry argument into an absolute deadline. `Err` when it is
/// not an integer, `Ok(None)` when it is out of range (non-positive or
/// overflowing), as Redis distinguishes the two.
fn deadline(arg: &[u8], kind: ExpiryOption, now_ms: u64) -> Result<Option<u64>, ()> {
    let value = parse_i64(arg).ok_or(())?;
    if value <= 0 {
        return Ok(None);
    }
    let value = value as u64;
    Ok(match kind {
        ExpiryOption::RelativeSeconds => value
            .checked_mul(1000)
            .and_then(|ms| ms.checked_add(now_ms)),
        ExpiryOption::RelativeMillis => value.checked_add(now_ms),
        ExpiryOption::AtSeconds => value.checked_mul(1000),
        ExpiryOption::AtMillis => Some(value),
        ExpiryOption::Clear | ExpiryOption::Keep => None,
    }
    .filter(|&at| at <= i64::MAX as u64))
}

fn del(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let removed = args
        .iter_from(1)
        .filter(|key| ctx.store.remove(key, ctx.now_ms))
        .count();
    resp::integer(out, removed as i64);
    Flow::Continue
}

fn exists(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let found = args
        .iter_from(1)
        .filter(|key| ctx.store.contains(key, ctx.now_ms))
        .count();
    resp::integer(out, found as i64);
    Flow::Continue
}

fn incr(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    add(args.get(1), 1, ctx, out)
}

fn decr(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    add(args.get(1), -1, ctx, out)
}

fn incrby(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    match parse_i64(args.get(2)) {
        Some(delta) => add(args.get(1), delta, ctx, out),
        None => {
            resp::error(out, NOT_AN_INTEGER);
            Flow::Continue
        }
    }
}

fn decrby(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    // Negating i64::MIN cannot be represented; Redis reports it the same way.
    match parse_i64(args.get(2)).and_then(i64::checked_neg) {
        Some(delta) => add(args.get(1), delta, ctx, out),
        None => {
            resp::error(out, NOT_AN_INTEGER);
            Flow::Continue
        }
    }
}

/// Shared by the INCR family; keeps the key's expiry, as Redis does.
fn add(key: &[u8], delta: i64, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let current = match ctx.store.get(key, ctx.now_ms) {
        None => 0,
        Some(entry) => match parse_i64(&entry.value) {
            Some(value) => value,
            None => {
                resp::error(out, NOT_AN_INTEGER);
                return Flow::Continue;
            }
        },
    };
    let Some(next) = current.checked_add(delta) else {
        resp::error(out, b"ERR increment or decrement would overflow");
        return Flow::Continue;
    };
    match ctx.store.entry_or_empty(key, ctx.now_ms) {
        Some(entry) => {
            entry.value.clear();
            push_decimal(&mut entry.value, next);
            resp::integer(out, next);
        }
        None => resp::error(out, b"ERR internal error"),
    }
    Flow::Continue
}

fn mget(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    resp::array_header(out, args.len() - 1);
    for key in args.iter_from(1) {
        match ctx.store.get(key, ctx.now_ms) {
            Some(entry) => resp::bulk(out, &entry.value),
            None => resp::null(out),
        }
    }
    Flow::Continue
}

fn mset(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    if args.len().is_multiple_of(2) {
        wrong_arity(b"mset", out);
        return Flow::Continue;
    }
    for pair in (1..args.len()).step_by(2) {
        ctx.store.set(args.get(pair), args.get(pair + 1), None);
    }
    resp::simple(out, b"OK");
    Flow::Continue
}

fn append(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let addition = args.get(2);
    let Some(entry) = ctx.store.entry_or_empty(args.get(1), ctx.now_ms) else {
        resp::error(out, b"ERR internal error");
        return Flow::Continue;
    };
    // One request is capped at 64 MiB, but repeated APPENDs could otherwise
    // grow a value until the capsule's arena is exhausted; 512 MiB is Redis's cap.
    if entry.value.len().saturating_add(addition.len()) > resp::MAX_BULK_LEN * 8 {
        resp::error(out, b"ERR string exceeds maximum allowed size");
        return Flow::Continue;
    }
    entry.value.extend_from_slice(addition);
    resp::integer(out, entry.value.len() as i64);
    Flow::Continue
}

fn strlen(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let len = ctx
        .store
        .get(args.get(1), ctx.now_ms)
        .map_or(0, |e| e.value.len());
    resp::integer(out, len as i64);
    Flow::Continue
}

fn keys(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let pattern = args.get(1);
    let matching: Vec<&[u8]> = ctx
        .store
        .live_entries(ctx.now_ms)
        .map(|(key, _)| key)
        .filter(|key| glob::matches(pattern, key))
        .collect();
    resp::array_header(out, matching.len());
    for key in matching {
        resp::bulk(out, key);
    }
    Flow::Continue
}

fn dbsize(_: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    resp::integer(out, ctx.store.live_len(ctx.now_ms) as i64);
    Flow::Continue
}

fn flushall(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let mode_ok = match args.len() {
        1 => true,
        2 => {
            args.get(1).eq_ignore_ascii_case(b"async") || args.get(1).eq_ignore_ascii_case(b"sync")
        }
        _ => false,
    };
    if mode_ok {
        ctx.store.clear();
        resp::simple(out, b"OK");
    } else {
        resp::error(out, SYNTAX_ERROR);
    }
    Flow::Continue
}

fn expire(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    set_expiry(args, ctx, out, 1000, b"expire")
}

fn pexpire(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    set_expiry(args, ctx, out, 1, b"pexpire")
}

/// EXPIRE/PEXPIRE key amount [NX|XX|GT|LT]. A deadline already in the past
/// deletes the key, as in Redis.
fn set_expiry(
    args: &Args<'_>,
    ctx: &mut Context<'_, '_>,
    out: &mut Vec<u8>,
    unit_ms: i64,
    name: &[u8],
) -> Flow {
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for option in args.iter_from(3) {
        if option.eq_ignore_ascii_case(b"nx") {
            nx = true;
        } else if option.eq_ignore_ascii_case(b"xx") {
            xx = true;
        } else if option.eq_ignore_ascii_case(b"gt") {
            gt = true;
        } else if option.eq_ignore_ascii_case(b"lt") {
            lt = true;
        } else {
            let mut message = b"ERR Unsupported option ".to_vec();
            message.extend_from_slice(option);
            resp::error(out, &message);
            return Flow::Continue;
        }
    }
    if nx && (xx || gt || lt) {
        resp::error(
            out,
            b"ERR NX and XX, GT or LT options at the same time are not compatible",
        );
        return Flow::Continue;
    }
    if gt && lt {
        resp::error(
            out,
            b"ERR GT and LT options at the same time are not compatible",
        );
        return Flow::Continue;
    }
    let Some(amount) = parse_i64(args.get(2)) else {
        resp::error(out, NOT_AN_INTEGER);
        return Flow::Continue;
    };
    let deadline = amount
        .checked_mul(unit_ms)
        .and_then(|ms| ms.checked_add(i64::try_from(ctx.now_ms).ok()?));
    let Some(deadline) = deadline else {
        let mut message = b"ERR invalid expire time in '".to_vec();
        message.extend_from_slice(name);
        message.extend_from_slice(b"' command");
        resp::error(out, &message);
        return Flow::Continue;
    };
    let key = args.get(1);
    let now_ms = ctx.now_ms;
    let Some(entry) = ctx.store.get_mut(key, now_ms) else {
        resp::integer(out, 0);
        return Flow::Continue;
    };
    // No expiry counts as an infinite one for GT and LT.
    let current = entry.expires_at_ms.map(i128::from).unwrap_or(i128::MAX);
    let wanted = i128::from(deadline);
    let applies = !(nx && entry.expires_at_ms.is_some()
        || xx && entry.expires_at_ms.is_none()
        || gt && wanted <= current
        || lt && wanted >= current);
    if !applies {
        resp::integer(out, 0);
    } else if deadline <= now_ms as i64 {
        ctx.store.remove(key, now_ms);
        resp::integer(out, 1);
    } else {
        entry.expires_at_ms = Some(deadline as u64);
        resp::integer(out, 1);
    }
    Flow::Continue
}

fn persist(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let cleared = match ctx.store.get_mut(args.get(1), ctx.now_ms) {
        Some(entry) => entry.expires_at_ms.take().is_some(),
        None => false,
    };
    resp::integer(out, i64::from(cleared));
    Flow::Continue
}

fn ttl(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    // Redis rounds the remaining time to the nearest second.
    remaining(args, ctx, out, |ms| (ms + 500) / 1000)
}

fn pttl(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    remaining(args, ctx, out, |ms| ms)
}

fn remaining(
    args: &Args<'_>,
    ctx: &mut Context<'_, '_>,
    out: &mut Vec<u8>,
    scale: fn(u64) -> u64,
) -> Flow {
    let reply = match ctx.store.get(args.get(1), ctx.now_ms) {
        None => -2,
        Some(entry) => match entry.expires_at_ms {
            None => -1,
            Some(at) => scale(at.saturating_sub(ctx.now_ms)).min(i64::MAX as u64) as i64,
        },
    };
    resp::integer(out, reply);
    Flow::Continue
}

fn info(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let wants = |section: &[u8]| {
        args.len() == 1
            || args.iter_from(1).any(|asked| {
                asked.eq_ignore_ascii_case(section)
                    || [&b"all"[..], b"default", b"everything"]
                        .iter()
                        .any(|group| asked.eq_ignore_ascii_case(group))
            })
    };
    let info = ctx.info;
    let mut text = Vec::with_capacity(512);
    if wants(b"server") {
        text.extend_from_slice(
            b"# Server\r\nredis_version:7.0.0-capsules\r\nredis_mode:standalone\r\n",
        );
        info_field(&mut text, b"capsule", info.capsule.as_bytes());
        info_field(&mut text, b"locator", info.locator.as_bytes());
        info_field(&mut text, b"vm", info.vm.as_bytes());
        info_number(&mut text, b"uptime_in_seconds", info.uptime_ms / 1000);
        info_number(&mut text, b"uptime_in_days", info.uptime_ms / 86_400_000);
        text.extend_from_slice(b"\r\n");
    }
    if wants(b"clients") {
        text.extend_from_slice(b"# Clients\r\n");
        info_number(
            &mut text,
            b"connected_clients",
            u64::from(info.connected_clients),
        );
        text.extend_from_slice(b"\r\n");
    }
    if wants(b"stats") {
        text.extend_from_slice(b"# Stats\r\n");
        let total = info.total_commands.saturating_add(ctx.commands_in_call);
        info_number(&mut text, b"total_commands_processed", total);
        text.extend_from_slice(b"\r\n");
    }
    if wants(b"keyspace") {
        text.extend_from_slice(b"# Keyspace\r\ndb0:keys=");
        let (mut keys, mut expires) = (0i64, 0i64);
        for (_, entry) in ctx.store.live_entries(ctx.now_ms) {
            keys += 1;
            expires += i64::from(entry.expires_at_ms.is_some());
        }
        push_decimal(&mut text, keys);
        text.extend_from_slice(b",expires=");
        push_decimal(&mut text, expires);
        text.extend_from_slice(b",avg_ttl=0\r\n");
    }
    resp::bulk(out, &text);
    Flow::Continue
}

/// Values come from the kernel, but a stray CR/LF or ':' in a capsule name
/// would still corrupt the `key:value` lines clients parse.
fn info_field(text: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    text.extend_from_slice(key);
    text.push(b':');
    text.extend(
        value
            .iter()
            .map(|&b| if b.is_ascii_control() { b' ' } else { b }),
    );
    text.extend_from_slice(b"\r\n");
}

fn info_number(text: &mut Vec<u8>, key: &[u8], value: u64) {
    text.extend_from_slice(key);
    text.push(b':');
    push_decimal(text, value.min(i64::MAX as u64) as i64);
    text.extend_from_slice(b"\r\n");
}

fn select(args: &Args<'_>, _: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    match parse_i64(args.get(1)) {
        Some(0) => resp::simple(out, b"OK"),
        Some(_) => resp::error(out, b"ERR DB index is out of range"),
        None => resp::error(out, NOT_AN_INTEGER),
    }
    Flow::Continue
}

fn client(args: &Args<'_>, ctx: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    let sub = args.get(1);
    let full_name = |out: &mut Vec<u8>| {
        let mut name = b"client|".to_vec();
        name.extend(sub.iter().map(u8::to_ascii_lowercase));
        wrong_arity(&name, out);
    };
    if sub.eq_ignore_ascii_case(b"setname") {
        if args.len() != 3 {
            full_name(out);
        } else if args.get(2).iter().any(|&b| !(b'!'..=b'~').contains(&b)) {
            resp::error(
                out,
                b"ERR Client names cannot contain spaces, newlines or special characters.",
            );
        } else {
            let name = args.get(2);
            *ctx.client_name = (!name.is_empty()).then(|| name.to_vec());
            resp::simple(out, b"OK");
        }
    } else if sub.eq_ignore_ascii_case(b"getname") {
        if args.len() != 2 {
            full_name(out);
        } else {
            match ctx.client_name.as_deref() {
                Some(name) => resp::bulk(out, name),
                None => resp::null(out),
            }
        }
    } else if sub.eq_ignore_ascii_case(b"setinfo") {
        // Client libraries announce themselves with this; accepting it keeps
        // their connection setup quiet.
        if args.len() != 4 {
            full_name(out);
        } else {
            resp::simple(out, b"OK");
        }
    } else {
        let mut message = b"ERR unknown subcommand '".to_vec();
        message.extend_from_slice(&sub[..sub.len().min(128)]);
        message.extend_from_slice(b"'. Try CLIENT HELP.");
        resp::error(out, &message);
    }
    Flow::Continue
}

/// Just enough for clients that introspect on connect (redis-cli asks for
/// `COMMAND DOCS` to drive its hints); an empty answer means "no metadata".
fn command(args: &Args<'_>, _: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    if args.len() >= 2 && args.get(1).eq_ignore_ascii_case(b"count") {
        resp::integer(out, COMMANDS.len() as i64);
    } else {
        resp::array_header(out, 0);
    }
    Flow::Continue
}

fn quit(_: &Args<'_>, _: &mut Context<'_, '_>, out: &mut Vec<u8>) -> Flow {
    resp::simple(out, b"OK");
    Flow::Close
}
