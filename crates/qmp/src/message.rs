//! QMP messages: the greeting, requests as clients send them, replies and events.
//!
//! Request checking follows QEMU's order and words, because clients and tests match them:
//! the input must be an object; each member must be one of `execute`, `exec-oob` (only once
//! out-of-band execution was enabled), `arguments` (an object) and `id` (anything, echoed).

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::error::QmpError;

/// The QEMU version we speak for: clients gate features on it.
pub const QEMU_VERSION: (u32, u32, u32) = (10, 0, 0);

/// A parsed request.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    /// The command name.
    pub command: String,
    /// The arguments (empty when absent).
    pub arguments: Map<String, Value>,
    /// The client's id, echoed in the reply.
    pub id: Option<Value>,
    /// Sent with `exec-oob`.
    pub oob: bool,
}

/// A request that could not be understood, with the id to echo when there was one.
#[derive(Clone, Debug, PartialEq)]
pub struct BadRequest {
    /// The id, when the input had one.
    pub id: Option<Value>,
    /// What was wrong.
    pub error: QmpError,
}

/// Checks one parsed input value the way QEMU's dispatcher does.
pub fn parse_request(input: Value, oob_enabled: bool) -> Result<Request, BadRequest> {
    let Value::Object(mut obj) = input else {
        return Err(BadRequest {
            id: None,
            error: QmpError::generic("QMP input must be a JSON object"),
        });
    };
    let id = obj.remove("id");
    let bad = |desc: String| BadRequest {
        id: id.clone(),
        error: QmpError::generic(desc),
    };
    let mut command = None;
    let mut oob = false;
    let mut arguments = Map::new();
    for (key, value) in obj {
        match (key.as_str(), value) {
            ("execute", Value::String(s)) => command = Some(s),
            ("exec-oob", Value::String(s)) if oob_enabled => {
                command = Some(s);
                oob = true;
            }
            ("execute" | "exec-oob", _) if key != "exec-oob" || oob_enabled => {
                return Err(bad(format!("QMP input member '{key}' must be a string")));
            }
            ("arguments", Value::Object(args)) => arguments = args,
            ("arguments", _) => {
                return Err(bad("QMP input member 'arguments' must be an object".into()))
            }
            _ => return Err(bad(format!("QMP input member '{key}' is unexpected"))),
        }
    }
    let Some(command) = command else {
        return Err(bad("QMP input lacks member 'execute'".into()));
    };
    Ok(Request {
        command,
        arguments,
        id,
        oob,
    })
}

/// The greeting sent when a client connects.
pub fn greeting(package: &str) -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"QMP": {
        "version": {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": package},
        "capabilities": ["oob"]
    }})
}

/// A success reply.
pub fn reply(value: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), value);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

/// An error reply (QEMU puts `id` first in these).
pub fn error_reply(error: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    m.insert(
        "error".into(),
        json!({"class": error.class.as_str(), "desc": error.desc}),
    );
    Value::Object(m)
}

/// An asynchronous event, stamped when created.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// The event name (`BLOCK_JOB_COMPLETED`, …).
    pub name: &'static str,
    /// The payload, when the event has one.
    pub data: Option<Value>,
    /// Seconds and microseconds since the epoch.
    pub timestamp: (u64, u32),
    /// Order of creation in the process (see [`event_watermark`]).
    pub seq: u64,
}

static EVENT_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The `seq` of the newest event created so far: a reply that carries it goes out after every
/// event up to it and before every later one.
pub fn event_watermark() -> u64 {
    EVENT_SEQ.load(std::sync::atomic::Ordering::SeqCst) - 1
}

impl Event {
    /// An event stamped now.
    pub fn new(name: &'static str, data: Option<Value>) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            name,
            data,
            timestamp: (now.as_secs(), now.subsec_micros()),
            seq: EVENT_SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        }
    }

    /// The event as QEMU writes it: `{"timestamp": {"seconds", "microseconds"}, "event", "data"}`.
    pub fn to_value(&self) -> Value {
        let mut m = Map::new();
        m.insert(
            "timestamp".into(),
            json!({"seconds": self.timestamp.0, "microseconds": self.timestamp.1}),
        );
        m.insert("event".into(), Value::String(self.name.into()));
        if let Some(data) = &self.data {
            m.insert("data".into(), data.clone());
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bad(v: Value) -> String {
        parse_request(v, false).expect_err("bad").error.desc
    }

    #[test]
    fn qemu_messages_for_malformed_requests() {
        assert_eq!(bad(json!([1])), "QMP input must be a JSON object");
        assert_eq!(
            bad(json!({"foo": 1})),
            "QMP input member 'foo' is unexpected"
        );
        assert_eq!(
            bad(json!({"execute": 1})),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            bad(json!({"execute": "x", "arguments": []})),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            bad(json!({"exec-oob": "x"})),
            "QMP input member 'exec-oob' is unexpected"
        );
        assert_eq!(bad(json!({"id": 1})), "QMP input lacks member 'execute'");
        let e =
            parse_request(json!({"execute": "q", "id": {"a": 1}, "x": 1}), false).expect_err("bad");
        assert_eq!(
            e.id,
            Some(json!({"a": 1})),
            "the id is echoed even on errors"
        );
    }

    #[test]
    fn oob_requests_once_enabled() {
        let r = parse_request(json!({"exec-oob": "q"}), true).expect("ok");
        assert!(r.oob);
        assert_eq!(r.command, "q");
    }

    #[test]
    fn event_layout() {
        let e = Event {
            name: "X",
            data: Some(json!({"id": "j"})),
            timestamp: (5, 7),
            seq: 0,
        };
        assert_eq!(
            serde_json::to_string(&e.to_value()).expect("json"),
            r#"{"timestamp":{"seconds":5,"microseconds":7},"event":"X","data":{"id":"j"}}"#
        );
    }
}
