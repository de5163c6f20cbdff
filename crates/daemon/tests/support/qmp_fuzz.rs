//! The QMP decoding harness shared by the cargo-fuzz target `qmp_decode` and the short stable
//! run in the tests: bytes from a client go through framing, JSON parsing, request checking
//! and schema checking of the daemon's real schema (as JSON and as key=value start-up
//! options). Nothing may panic, and framing must not depend on how the bytes were split.

use std::sync::LazyLock;

use daemon::keyval;
use qmp::message::parse_request;
use qmp::wire::{parse, Frame, Framer};
use qmp::Schema;
use serde_json::Value;

static SCHEMA: LazyLock<Schema> = LazyLock::new(daemon::schema::schema);

fn frames(chunks: &[&[u8]]) -> Vec<Frame> {
    let mut f = Framer::default();
    let mut out = Vec::new();
    for c in chunks {
        f.push(c, &mut out);
    }
    f.finish(&mut out);
    out
}

/// Runs `data` through the decoder; returns how many requests passed schema checking.
pub fn exercise(data: &[u8]) -> usize {
    let whole = frames(&[data]);
    let split = data
        .first()
        .map_or(0, |b| usize::from(*b) % (data.len() + 1));
    let (a, b) = data.split_at(split);
    assert_eq!(whole, frames(&[a, b]), "framing depends on the split");
    let mut checked = 0;
    for frame in whole {
        let Frame::Message(msg) = frame else {
            continue;
        };
        let Ok(value) = parse(&msg) else {
            continue;
        };
        let oob = msg.len() % 2 == 0;
        let Ok(mut req) = parse_request(value, oob) else {
            continue;
        };
        if SCHEMA
            .check_arguments(&req.command, &mut req.arguments, false)
            .is_ok()
        {
            checked += 1;
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(mut args) = keyval::parse(text, None) {
            if SCHEMA
                .check_arguments("blockdev-add", &mut args, true)
                .is_ok()
            {
                checked += 1;
                // A checked keyval option set is JSON the handlers can read.
                let _ = Value::Object(args).to_string();
            }
        }
    }
    checked
}
