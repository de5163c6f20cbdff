//! Start-up, the QMP sockets and shutdown.
//!
//! ```text
//!  Config items, in order ──▶ Control::execute (blockdev-add …)  ─┐ same handlers
//!  QMP sockets ─▶ sessions ─▶ ControlHandle ─▶ control loop ──────┘
//!  quit / SIGINT / SIGTERM ─▶ shutdown: sessions finish their output, nodes are flushed
//!                             and closed (qcow2 marked clean), sockets and pidfile removed
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use qmp::MonitorHub;
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

use crate::cli::{CliError, Config, Item, Listen};
use crate::control::{Control, ControlHandle};
use serde_json::{json, Map, Value};

/// The `package` string clients see in the greeting and `query-version`.
pub fn package() -> String {
    format!("blockjob {}", env!("CARGO_PKG_VERSION"))
}

enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

enum Conn {
    Unix(UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Conn> {
        match self {
            Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
        }
    }
}

struct Chardev {
    listener: Listener,
    /// The client accepted during start-up (`wait=on`).
    first: Option<Conn>,
}

/// Binds a unix socket readable and writable by the owner only (mode 0600). The umask is
/// narrowed around `bind`, so the socket never exists with wider permissions.
fn bind_unix(path: &PathBuf) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // SAFETY: umask only swaps the process's file-creation mask; start-up runs before any
    // other thread creates files.
    let old = unsafe { libc::umask(0o077) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above, restores the previous mask.
    unsafe { libc::umask(old) };
    let std_listener = bound?;
    // Sockets are created 0777 & !umask = 0700; QEMU's contract is read-write for the owner.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std_listener.set_nonblocking(true)?;
    UnixListener::from_std(std_listener)
}

async fn open_chardev(listen: &Listen, wait: bool) -> std::io::Result<Chardev> {
    let listener = match listen {
        Listen::Unix(path) => Listener::Unix(bind_unix(path)?, path.clone()),
        Listen::Tcp(host, port) => Listener::Tcp(TcpListener::bind((host.as_str(), *port)).await?),
    };
    let first = if wait {
        Some(listener.accept().await?)
    } else {
        None
    };
    Ok(Chardev { listener, first })
}

/// What start-up built.
struct Started {
    control: Control,
    monitors: Vec<(Chardev, bool)>,
    sockets: Vec<PathBuf>,
}

/// `--nbd-server` takes a flat address (`addr.type=unix,addr.path=…`); `nbd-server-start`
/// takes QMP's legacy form (`addr: {type, data: {…}}`).
fn legacy_address(mut args: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(mut addr)) = args.remove("addr") {
        let ty = addr.remove("type").unwrap_or(Value::Null);
        args.insert("addr".into(), json!({"type": ty, "data": addr}));
    }
    args
}

/// Checks a start-up option against the schema and runs it through the command handler.
async fn run_option(
    control: &mut Control,
    option: &str,
    command: &str,
    check_as: Option<&str>,
    args: &Map<String, Value>,
    keyval: bool,
) -> Result<(), CliError> {
    let mut args = args.clone();
    let schema = control.schema.clone();
    let checked = match check_as {
        Some(ty) => schema
            .check_type(ty, &mut args, keyval)
            .map(|()| legacy_address(args)),
        None => schema
            .check_arguments(command, &mut args, keyval)
            .map(|()| args),
    };
    let result = match checked {
        Ok(args) => control.execute(command, args).await.map(|_| ()),
        Err(e) => Err(e),
    };
    result.map_err(|e| CliError(format!("--{option}: {}", e.desc)))
}

async fn start(
    config: &Config,
    shutdown: Arc<watch::Sender<bool>>,
    events: broadcast::Sender<qmp::Event>,
) -> Result<Started, (CliError, Started)> {
    let mut s = Started {
        control: Control::new(
            Arc::new(crate::schema::schema()),
            package(),
            shutdown,
            events,
        ),
        monitors: Vec::new(),
        sockets: Vec::new(),
    };
    s.control.nodes.io = config.io;
    let mut chardevs: HashMap<String, Chardev> = HashMap::new();
    for item in &config.items {
        let step = match item {
            Item::Blockdev { args, keyval } => {
                let c = &mut s.control;
                run_option(c, "blockdev", "blockdev-add", None, args, *keyval).await
            }
            Item::NbdServer { args, keyval } => {
                let c = &mut s.control;
                let ty = Some("NbdServerOptions");
                run_option(c, "nbd-server", "nbd-server-start", ty, args, *keyval).await
            }
            Item::Object { args, keyval } => {
                let c = &mut s.control;
                run_option(c, "object", "object-add", None, args, *keyval).await
            }
            Item::Export { args, keyval } => {
                let c = &mut s.control;
                run_option(c, "export", "block-export-add", None, args, *keyval).await
            }
            Item::Chardev { id, listen, wait } => {
                if chardevs.contains_key(id) {
                    Err(CliError(format!("--chardev: duplicate chardev id '{id}'")))
                } else {
                    match open_chardev(listen, *wait).await {
                        Ok(c) => {
                            if let Listener::Unix(_, p) = &c.listener {
                                s.sockets.push(p.clone());
                            }
                            chardevs.insert(id.clone(), c);
                            Ok(())
                        }
                        Err(e) => Err(CliError(format!("--chardev {id}: {e}"))),
                    }
                }
            }
            Item::Monitor { chardev, pretty } => match chardevs.remove(chardev) {
                Some(c) => {
                    s.monitors.push((c, *pretty));
                    Ok(())
                }
                None => Err(CliError(format!(
                    "--monitor: chardev '{chardev}' not found, or already used by a monitor"
                ))),
            },
        };
        if let Err(e) = step {
            return Err((e, s));
        }
    }
    Ok(s)
}

async fn serve_monitor(
    chardev: Chardev,
    pretty: bool,
    hub: MonitorHub,
    sessions: Arc<tokio::sync::Mutex<JoinSet<()>>>,
) {
    let mut stop = hub.shutdown.clone();
    let mut next = chardev.first;
    loop {
        let conn = match next.take() {
            Some(c) => c,
            None => tokio::select! {
                c = chardev.listener.accept() => match c {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(target: "blockjobd", "accepting a QMP client: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.changed() => return,
            },
        };
        let hub = hub.clone();
        let mut set = sessions.lock().await;
        match conn {
            Conn::Unix(s) => set.spawn(async move { hub.serve(s, pretty).await }),
            Conn::Tcp(s) => set.spawn(async move { hub.serve(s, pretty).await }),
        };
    }
}

async fn wait_for_signal(shutdown: Arc<watch::Sender<bool>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("blockjobd: cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = int.recv() => {},
        _ = term.recv() => {},
    }
    shutdown.send_replace(true);
}

fn cleanup(sockets: &[PathBuf], pidfile: Option<&PathBuf>) {
    for p in sockets.iter().chain(pidfile) {
        let _ = std::fs::remove_file(p);
    }
}

/// Runs the daemon until it is told to quit. `ready` is called once start-up succeeded
/// (`--daemonize` detaches there). Returns the exit status.
pub async fn run(config: Config, ready: impl FnOnce()) -> i32 {
    let (tx, mut shutdown_rx) = watch::channel(false);
    let shutdown = Arc::new(tx);
    let (events, _) = broadcast::channel(qmp::server::EVENT_BACKLOG);
    let started = match start(&config, shutdown.clone(), events.clone()).await {
        Ok(s) => s,
        Err((e, mut partial)) => {
            eprintln!("blockjobd: {e}");
            partial.control.close_all().await;
            cleanup(&partial.sockets, None);
            return 1;
        }
    };
    if let Some(p) = &config.pidfile {
        if let Err(e) = std::fs::write(p, format!("{}\n", std::process::id())) {
            eprintln!("blockjobd: --pidfile {}: {e}", p.display());
            let mut control = started.control;
            control.close_all().await;
            cleanup(&started.sockets, None);
            return 1;
        }
    }
    ready();
    tokio::spawn(give_back_memory_when_idle());
    let schema = started.control.schema.clone();
    let (handle, control_task): (ControlHandle, _) = started.control.spawn();
    let hub = MonitorHub {
        schema,
        dispatcher: Arc::new(handle),
        events,
        package: package(),
        shutdown: shutdown_rx.clone(),
    };
    let sessions = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
    let mut accept_loops = JoinSet::new();
    for (chardev, pretty) in started.monitors {
        accept_loops.spawn(serve_monitor(
            chardev,
            pretty,
            hub.clone(),
            sessions.clone(),
        ));
    }
    tokio::spawn(wait_for_signal(shutdown.clone()));
    while !*shutdown_rx.borrow() {
        if shutdown_rx.changed().await.is_err() {
            break;
        }
    }
    drop(hub);
    while accept_loops.join_next().await.is_some() {}
    {
        let mut set = sessions.lock().await;
        let drained = tokio::time::timeout(Duration::from_secs(5), async {
            while set.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            set.abort_all();
        }
    }
    let mut status = 0;
    match control_task.await {
        Ok(mut control) => control.close_all().await,
        Err(e) => {
            tracing::error!(target: "blockjobd", "control loop failed: {e}");
            status = 1;
        }
    }
    cleanup(&started.sockets, config.pidfile.as_ref());
    status
}

/// Once I/O has stopped for a second after a burst, hands the memory the allocator kept from
/// it back to the system (`malloc_trim`): request buffers are freed when their requests end,
/// but glibc keeps freed memory in its per-thread arenas, so after 16 NBD clients with 8
/// requests each the daemon stayed at its peak. Only when idle, so that no request waits
/// behind the arenas' locks.
async fn give_back_memory_when_idle() {
    let mut seen = drivers::engine::activity();
    let mut trimmed = seen;
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = drivers::engine::activity();
        if now == seen && now != trimmed {
            trim_heap();
            trimmed = now;
        }
        seen = now;
    }
}

#[cfg(target_env = "gnu")]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers; it only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(target_env = "gnu"))]
fn trim_heap() {}
