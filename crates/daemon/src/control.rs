//! The control plane: one owner of the daemon's state applies commands one at a time.
//!
//! QMP sessions and start-up options reach the same [`Control::execute`]; sessions through a
//! channel ([`ControlHandle`], the QMP dispatcher), start-up options directly before any
//! session exists. Nothing else mutates the node registry.

use std::sync::Arc;

use async_trait::async_trait;
use qmp::{QmpError, QmpResult, Schema};
use serde_json::{Map, Value};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::commands;
use crate::exports::Exports;
use crate::nodes::Nodes;

/// How long a reply waits for the jobs a command woke (see [`job::JobManager::quiesce`]).
const QUIESCE_BOUND: std::time::Duration = std::time::Duration::from_secs(1);

/// The daemon's state, owned by the control loop.
#[derive(Debug)]
pub struct Control {
    /// Named nodes.
    pub nodes: Nodes,
    /// What we implement.
    pub schema: Arc<Schema>,
    /// The `package` string of `query-version`.
    pub package: String,
    /// Set to true to shut the daemon down.
    pub shutdown: Arc<watch::Sender<bool>>,
    /// Where events go (every negotiated monitor).
    pub events: broadcast::Sender<qmp::Event>,
    /// The NBD server and the block exports.
    pub exports: Exports,
    /// Every job.
    pub jobs: job::JobManager,
}

/// A command on its way to the control loop.
#[derive(Debug)]
struct Call {
    command: String,
    arguments: Map<String, Value>,
    /// The result, and the newest event that goes before it (see `qmp::event_watermark`).
    reply: oneshot::Sender<(QmpResult<Value>, u64)>,
    /// The monitor's span for the command: what the loop logs while running it belongs to it.
    span: tracing::Span,
}

/// The sending side of the control loop: what monitors dispatch through.
#[derive(Clone, Debug)]
pub struct ControlHandle(mpsc::Sender<Call>);

impl Control {
    /// Runs one checked command.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Map<String, Value>,
    ) -> QmpResult<Value> {
        self.nodes.prune();
        commands::execute(self, command, arguments).await
    }

    /// A control state with no nodes and no exports.
    pub fn new(
        schema: Arc<Schema>,
        package: String,
        shutdown: Arc<watch::Sender<bool>>,
        events: broadcast::Sender<qmp::Event>,
    ) -> Self {
        let exports = Exports::new(events.clone());
        let jobs = job::JobManager::new(crate::jobs::event_sink(events.clone()));
        Control {
            nodes: Nodes::default(),
            schema,
            package,
            shutdown,
            events,
            exports,
            jobs,
        }
    }

    /// Cancels every job, ends every export and the NBD server, then closes every node
    /// (shutdown).
    pub async fn close_all(&mut self) {
        self.jobs.cancel_all().await;
        self.exports.shutdown().await;
        self.nodes.close_all().await;
    }

    /// Starts the loop; it ends when the daemon shuts down and hands the state back.
    pub fn spawn(mut self) -> (ControlHandle, tokio::task::JoinHandle<Control>) {
        let (tx, mut rx) = mpsc::channel::<Call>(64);
        let mut stop = self.shutdown.subscribe();
        let task = tokio::spawn(async move {
            loop {
                if *stop.borrow() {
                    break;
                }
                let call = tokio::select! {
                    c = rx.recv() => match c {
                        Some(c) => c,
                        None => break,
                    },
                    _ = stop.changed() => continue,
                };
                let result = {
                    use tracing::Instrument;
                    self.execute(&call.command, call.arguments)
                        .instrument(call.span)
                        .await
                };
                // Jobs the command woke or started run up to their next wait first, so their
                // events come before the reply, as in QEMU.
                self.jobs.quiesce(QUIESCE_BOUND).await;
                // The reply's place among the events: what jobs do from now on comes after it,
                // even if a job's event reaches the monitor before the reply does.
                let before = qmp::event_watermark();
                // The caller may have gone (client disconnected mid-command): nothing to do.
                let _ = call.reply.send((result, before));
            }
            self
        });
        (ControlHandle(tx), task)
    }
}

#[async_trait]
impl qmp::Dispatcher for ControlHandle {
    async fn dispatch(&self, command: &str, arguments: Map<String, Value>) -> QmpResult<Value> {
        self.dispatch_ordered(command, arguments).await.0
    }

    async fn dispatch_ordered(
        &self,
        command: &str,
        arguments: Map<String, Value>,
    ) -> (QmpResult<Value>, Option<u64>) {
        let (reply, answer) = oneshot::channel();
        let call = Call {
            command: command.to_owned(),
            arguments,
            reply,
            span: tracing::Span::current(),
        };
        let gone = || QmpError::generic("blockjobd is shutting down");
        if self.0.send(call).await.is_err() {
            return (Err(gone()), None);
        }
        match answer.await {
            Ok((result, before)) => (result, Some(before)),
            Err(_) => (Err(gone()), None),
        }
    }
}
