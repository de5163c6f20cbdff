//! One monitor connection: greeting, capabilities negotiation, command dispatch, events.
//!
//! ```text
//!  socket ─read─▶ Framer ─▶ parse_request ─▶ negotiation gate ─▶ Schema::check_arguments
//!                                                                      │
//!  socket ◀─write── writer task ◀── replies (in order) ◀── Dispatcher ◀─┘
//!                        ▲
//!                        └── events (broadcast, after negotiation)
//! ```
//!
//! Commands of one connection run one at a time, in order, as in QEMU. Every event carries
//! its place in the process's order and every reply the newest place when its result was
//! decided: the writer sends a reply after the events before it and before the ones after it,
//! so an event a command emits reaches the client before that command's reply, the order QEMU
//! produces, and an event of a job that went on after the reply never overtakes it.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{broadcast, mpsc, watch};

use crate::error::{ErrorClass, QmpError, QmpResult};
use crate::message::{
    error_reply, event_watermark, greeting, parse_request, reply, Event, Request,
};
use crate::schema::Schema;
use crate::wire::{parse, to_line, Frame, Framer};

/// Runs checked commands. Implemented by the daemon's control plane.
#[async_trait]
pub trait Dispatcher: Send + Sync {
    /// Runs `command` with arguments already checked against the schema.
    async fn dispatch(&self, command: &str, arguments: Map<String, Value>) -> QmpResult<Value>;

    /// [`dispatch`](Self::dispatch), with the [`event_watermark`] of the moment the result
    /// was decided: the reply goes out after the events up to it and before later ones. `None`:
    /// the moment the result reaches the monitor.
    ///
    /// [`event_watermark`]: crate::message::event_watermark
    async fn dispatch_ordered(
        &self,
        command: &str,
        arguments: Map<String, Value>,
    ) -> (QmpResult<Value>, Option<u64>) {
        (self.dispatch(command, arguments).await, None)
    }
}

/// What every monitor of a daemon shares.
#[derive(Clone)]
pub struct MonitorHub {
    /// The commands and their argument types.
    pub schema: Arc<Schema>,
    /// Where commands go.
    pub dispatcher: Arc<dyn Dispatcher>,
    /// Events for every negotiated monitor.
    pub events: broadcast::Sender<Event>,
    /// The `package` string of the greeting and `query-version`.
    pub package: String,
    /// Flips to true when the daemon shuts down; sessions then finish their output and end.
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for MonitorHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitorHub")
            .field("package", &self.package)
            .finish_non_exhaustive()
    }
}

/// Events buffered per monitor before a slow client starts losing them.
pub const EVENT_BACKLOG: usize = 4096;

enum Out {
    Line(Vec<u8>),
    /// A reply, and the newest event that goes before it.
    Reply(Vec<u8>, u64),
    Events(broadcast::Receiver<Event>),
}

#[derive(Debug, Default)]
struct Session {
    negotiated: bool,
    oob: bool,
}

async fn next_event(rx: &mut Option<broadcast::Receiver<Event>>) -> Option<Event> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    loop {
        match r.recv().await {
            Ok(e) => return Some(e),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(target: "blockjobd", "a slow QMP client missed {n} events");
            }
            Err(broadcast::error::RecvError::Closed) => {
                *rx = None;
                return std::future::pending().await;
            }
        }
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(mut w: W, mut rx: mpsc::Receiver<Out>, pretty: bool) {
    let mut events: Option<broadcast::Receiver<Event>> = None;
    loop {
        let mut lines = Vec::new();
        tokio::select! {
            biased;
            out = rx.recv() => match out {
                Some(Out::Line(l)) => lines.push(l),
                Some(Out::Reply(l, before)) => {
                    // The events up to the reply's place first, then the reply, then what
                    // came after (one event at most was taken out of the queue).
                    let mut after = None;
                    while let Some(r) = events.as_mut() {
                        match r.try_recv() {
                            Ok(e) if e.seq <= before => lines.push(to_line(&e.to_value(), pretty)),
                            Ok(e) => {
                                after = Some(e);
                                break;
                            }
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                tracing::warn!(target: "blockjobd", "a slow QMP client missed {n} events");
                            }
                            Err(_) => break,
                        }
                    }
                    lines.push(l);
                    if let Some(e) = after {
                        lines.push(to_line(&e.to_value(), pretty));
                    }
                }
                Some(Out::Events(r)) => {
                    events = Some(r);
                    continue;
                }
                None => break,
            },
            Some(e) = next_event(&mut events) => lines.push(to_line(&e.to_value(), pretty)),
        };
        for line in lines {
            if w.write_all(&line).await.is_err() {
                return;
            }
        }
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
}

impl MonitorHub {
    /// Serves one connection until the client leaves or the daemon shuts down.
    pub async fn serve<S>(&self, stream: S, pretty: bool)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(16);
        let writer = tokio::spawn(write_loop(wr, rx, pretty));
        let hello = greeting(&self.package);
        if tx.send(Out::Line(to_line(&hello, pretty))).await.is_ok() {
            self.read_loop(&mut rd, &tx, pretty).await;
        }
        drop(tx);
        let _ = writer.await;
    }

    async fn read_loop<R: AsyncRead + Unpin>(
        &self,
        rd: &mut R,
        tx: &mpsc::Sender<Out>,
        pretty: bool,
    ) {
        let mut shutdown = self.shutdown.clone();
        let mut framer = Framer::default();
        let mut session = Session::default();
        let mut buf = vec![0u8; 64 << 10];
        let mut frames = Vec::new();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let n = tokio::select! {
                r = rd.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                _ = shutdown.changed() => return,
            };
            framer.push(&buf[..n], &mut frames);
            for frame in frames.drain(..) {
                let (line, subscribe, before) = self.handle(frame, &mut session).await;
                if tx
                    .send(Out::Reply(to_line(&line, pretty), before))
                    .await
                    .is_err()
                {
                    return;
                }
                if subscribe && tx.send(Out::Events(self.events.subscribe())).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Handles one frame; returns the reply, whether events start flowing now, and the newest
    /// event that goes before the reply.
    async fn handle(&self, frame: Frame, session: &mut Session) -> (Value, bool, u64) {
        let now = event_watermark;
        let msg = match frame {
            Frame::Error(desc) => {
                return (error_reply(&QmpError::generic(desc), None), false, now())
            }
            Frame::Message(m) => m,
        };
        let value = match parse(&msg) {
            Ok(v) => v,
            Err(desc) => return (error_reply(&QmpError::generic(desc), None), false, now()),
        };
        let req = match parse_request(value, session.oob) {
            Ok(r) => r,
            Err(bad) => return (error_reply(&bad.error, bad.id), false, now()),
        };
        let id = req.id.clone();
        let was_negotiated = session.negotiated;
        let span =
            tracing::debug_span!(target: "qmp_command", "qmp_command", command = %req.command);
        let (result, before) = {
            use tracing::Instrument;
            self.execute(req, session).instrument(span.clone()).await
        };
        let before = before.unwrap_or_else(now);
        match result {
            Ok(v) => (reply(v, id), !was_negotiated && session.negotiated, before),
            Err(e) => {
                // Logged once, here, where the error becomes the client's reply.
                span.in_scope(|| {
                    tracing::debug!(target: "qmp_command", class = ?e.class, "{}", e.desc);
                });
                (error_reply(&e, id), false, before)
            }
        }
    }

    async fn execute(
        &self,
        mut req: Request,
        session: &mut Session,
    ) -> (QmpResult<Value>, Option<u64>) {
        if req.command == "qmp_capabilities" {
            return (self.negotiate(req, session), None);
        }
        if !session.negotiated {
            let e = QmpError::new(
                ErrorClass::CommandNotFound,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            );
            return (Err(e), None);
        }
        if !self.schema.has_command(&req.command) {
            return (Err(QmpError::command_not_found(&req.command)), None);
        }
        if req.oob {
            let e = QmpError::generic(format!("The command {} does not support OOB", req.command));
            return (Err(e), None);
        }
        if let Err(e) = self
            .schema
            .check_arguments(&req.command, &mut req.arguments, false)
        {
            return (Err(e), None);
        }
        self.dispatcher
            .dispatch_ordered(&req.command, req.arguments)
            .await
    }

    fn negotiate(&self, mut req: Request, session: &mut Session) -> QmpResult<Value> {
        if session.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        self.schema
            .check_arguments("qmp_capabilities", &mut req.arguments, false)?;
        let enable = req.arguments.get("enable").and_then(Value::as_array);
        session.oob = enable.is_some_and(|caps| caps.iter().any(|c| c == "oob"));
        session.negotiated = true;
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};

    struct Echo(broadcast::Sender<Event>);

    #[async_trait]
    impl Dispatcher for Echo {
        async fn dispatch(&self, command: &str, args: Map<String, Value>) -> QmpResult<Value> {
            match command {
                "emit" => {
                    let _ = self.0.send(Event::new("PING", Some(Value::Object(args))));
                    Ok(json!({}))
                }
                _ => Ok(json!({"command": command})),
            }
        }
    }

    fn hub() -> (MonitorHub, watch::Sender<bool>) {
        let mut schema = Schema::new();
        schema
            .enumeration("QMPCapability", &["oob"])
            .object("CapArgs", &["*enable:[QMPCapability]"])
            .object("EmitArgs", &["*n:int"])
            .command("qmp_capabilities", Some("CapArgs"), None, &[])
            .command("emit", Some("EmitArgs"), None, &[])
            .command("hello", None, None, &[]);
        let (events, _) = broadcast::channel(16);
        let (stop_tx, stop_rx) = watch::channel(false);
        let hub = MonitorHub {
            schema: Arc::new(schema),
            dispatcher: Arc::new(Echo(events.clone())),
            events,
            package: "test".into(),
            shutdown: stop_rx,
        };
        (hub, stop_tx)
    }

    struct Client {
        rd: BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>,
        wr: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    }

    impl Client {
        async fn line(&mut self) -> Value {
            let mut s = String::new();
            self.rd.read_line(&mut s).await.expect("read");
            assert!(s.ends_with("\r\n"), "CRLF: {s:?}");
            serde_json::from_str(&s).expect("json")
        }
        async fn send(&mut self, s: &str) {
            self.wr.write_all(s.as_bytes()).await.expect("write");
        }
    }

    fn connect(hub: &MonitorHub) -> Client {
        let (a, b) = tokio::io::duplex(1 << 16);
        let hub = hub.clone();
        tokio::spawn(async move { hub.serve(b, false).await });
        let (rd, wr) = tokio::io::split(a);
        Client {
            rd: BufReader::new(rd),
            wr,
        }
    }

    #[tokio::test]
    async fn negotiation_dispatch_and_events() {
        let (hub, _stop) = hub();
        let mut a = connect(&hub);
        let mut b = connect(&hub);
        assert_eq!(a.line().await["QMP"]["capabilities"], json!(["oob"]));
        b.line().await;
        a.send(r#"{"execute":"hello"}"#).await;
        assert_eq!(a.line().await["error"]["class"], "CommandNotFound");
        a.send(r#"{"execute":"qmp_capabilities","id":1}"#).await;
        assert_eq!(a.line().await, json!({"return": {}, "id": 1}));
        a.send(r#"{"execute":"qmp_capabilities","id":2}"#).await;
        assert_eq!(a.line().await["error"]["class"], "CommandNotFound");
        b.send(r#"{"execute":"qmp_capabilities"}"#).await;
        b.line().await;
        a.send(r#"{"execute":"emit","arguments":{"n":3},"id":"x"}"#)
            .await;
        let ev = a.line().await;
        assert_eq!(ev["event"], "PING", "the event comes before the reply");
        assert!(ev["timestamp"]["seconds"].as_u64().is_some());
        assert_eq!(a.line().await, json!({"return": {}, "id": "x"}));
        assert_eq!(b.line().await["data"], json!({"n": 3}), "broadcast");
        a.send(r#"{"execute":"emit","arguments":{"n":"3"}}"#).await;
        assert_eq!(
            a.line().await["error"]["desc"],
            "Invalid parameter type for 'n', expected: integer"
        );
        a.send(r#"{"execute":"nope"}"#).await;
        assert_eq!(a.line().await["error"]["class"], "CommandNotFound");
        a.send("{\"execute\": ]").await;
        assert_eq!(a.line().await["error"]["class"], "GenericError");
        a.send(r#"{"execute":"hello"}"#).await;
        assert_eq!(a.line().await["return"]["command"], "hello", "still usable");
    }

    #[tokio::test]
    async fn oob_needs_enabling_and_is_refused_per_command() {
        let (hub, _stop) = hub();
        let mut a = connect(&hub);
        a.line().await;
        a.send(r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#)
            .await;
        a.line().await;
        a.send(r#"{"exec-oob":"hello","id":1}"#).await;
        assert_eq!(
            a.line().await["error"]["desc"],
            "The command hello does not support OOB"
        );
    }

    #[tokio::test]
    async fn shutdown_ends_sessions() {
        let (hub, stop) = hub();
        let (a, b) = tokio::io::duplex(1 << 16);
        let h = hub.clone();
        let task = tokio::spawn(async move { h.serve(b, false).await });
        stop.send(true).expect("send");
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .expect("session ends")
            .expect("join");
        drop(a);
    }
}
