//! qemu-storage-daemon's command line, parsed into start-up items run in order.
//!
//! `--blockdev` becomes a `blockdev-add` command checked by the same schema and run by the
//! same handler as over QMP; `--chardev` and `--monitor` set up QMP sockets; the rest is
//! parsed and refused with a message naming the option when we cannot honour it.

use std::path::PathBuf;

use serde_json::{Map, Value};

use crate::keyval;

/// The `--help` text.
pub const HELP: &str = "\
Usage: blockjobd [options]
A qemu-storage-daemon compatible storage daemon: block nodes driven over QMP.

  -h, --help                display this help and exit
  -V, --version             output version information and exit

  --blockdev [driver=]<driver>[,node-name=<N>][,discard=ignore|unmap]
             [,cache.direct=on|off][,cache.no-flush=on|off]
             [,read-only=on|off][,auto-read-only=on|off]
             [,detect-zeroes=off|on|unmap][,<driver options>]
  --blockdev <JSON>
                            configure a block node (drivers: file, raw, qcow2,
                            null-co, null-aio, blkdebug, nbd); runs blockdev-add
  --chardev socket,id=<id>,path=<file>[,server=on][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on][,wait=on|off]
                            a QMP listening socket (unix sockets are mode 0600)
  --monitor [chardev=]<id>[,mode=control][,pretty=on|off]
                            serve QMP on the chardev <id>
  --nbd-server addr.type=unix,addr.path=<file>[,max-connections=<n>]
               [,handshake-max-seconds=<s>]
  --nbd-server addr.type=inet,addr.host=<host>,addr.port=<port>[,…]
                            start the NBD server; runs nbd-server-start
  --export [type=]nbd,id=<id>,node-name=<N>[,name=<export>][,writable=on|off]
           [,writethrough=on|off][,description=<text>][,allocation-depth=on|off]
                            export a node over NBD; runs block-export-add
  --object <options>        throttle-group,id=<id>[,limits.bps-total=<n>,...] (the
                            limits of `throttle` nodes; other types are refused)
  --pidfile <path>          write the process ID to <path>
  --daemonize               detach once start-up succeeded
  -T, --trace [[enable=]<pattern>][,events=<file>][,file=<file>]
                            log the trace points matching <pattern> (* and ?
                            wildcards, a leading - disables) at every level, to
                            <file> (default stderr); events=<file> reads patterns,
                            one a line; --trace help lists the trace points
  --log-level error|warn|info|debug|trace
                            log everything at that level or above (default warn)

Values use QEMU's key=value syntax: ',,' is a literal comma, dotted keys nest
(file.filename=a.img). Options are applied in order; an invalid one stops start-up
with exit status 1.

Environment (for comparison runs; see the README's Performance section):
  BLOCKJOB_THREADS=<n>      threads running I/O tasks (default 1; 0: one thread
                            for everything, the control loop included)
  BLOCKJOB_AIO=threads      file nodes that name no aio= use the thread pool
                            instead of io_uring
  BLOCKJOB_WRITE_LANE=0     the thread pool does not serve buffered writes to a
                            file one at a time, in order
  BLOCKJOB_CACHED_READS=0   the thread pool hands every read to a worker
";

/// What to do.
#[derive(Debug)]
pub enum Action {
    /// Print help.
    Help,
    /// Print the version.
    Version,
    /// List the trace points (`--trace help`).
    TraceHelp,
    /// Run the daemon.
    Run(Config),
}

/// The daemon's configuration, in command-line order.
#[derive(Debug, Default)]
pub struct Config {
    /// Start-up items.
    pub items: Vec<Item>,
    /// `--pidfile`.
    pub pidfile: Option<PathBuf>,
    /// `--daemonize`.
    pub daemonize: bool,
    /// `--trace` and `--log-level`.
    pub trace: crate::trace::TraceConfig,
    /// How file nodes do host I/O (from the environment; see [`io_tuning_from_env`]).
    pub io: drivers::file::IoTuning,
}

/// The host I/O switches, read once at start-up: `BLOCKJOB_WRITE_LANE=0` leaves buffered
/// writes to the kernel's inode lock, `BLOCKJOB_CACHED_READS=0` sends every read to a
/// worker, and `BLOCKJOB_AIO=threads` makes the thread pool the engine of file nodes that do
/// not name one (io_uring otherwise), for comparison runs (README, Performance).
pub fn io_tuning_from_env() -> drivers::file::IoTuning {
    let off = |var: &str| std::env::var(var).as_deref() == Ok("0");
    drivers::file::IoTuning {
        write_lane: !off("BLOCKJOB_WRITE_LANE"),
        cached_reads: !off("BLOCKJOB_CACHED_READS"),
        aio: match std::env::var("BLOCKJOB_AIO").as_deref() {
            Ok("threads") => drivers::file::Aio::Threads,
            _ => drivers::file::Aio::IoUring,
        },
    }
}

/// How many threads run the daemon's tasks, read once at start-up from `BLOCKJOB_THREADS`:
/// 1 by default (README, Performance), `0` for one thread that also runs the control loop.
pub fn threads_from_env() -> usize {
    threads(std::env::var("BLOCKJOB_THREADS").ok().as_deref())
}

/// `BLOCKJOB_THREADS`'s value as a thread count; anything but a number is the default.
fn threads(value: Option<&str>) -> usize {
    value
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_THREADS)
}

/// See [`threads_from_env`].
pub const DEFAULT_THREADS: usize = 1;

/// Where a chardev listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP host and port.
    Tcp(String, u16),
}

/// One start-up item.
#[derive(Debug)]
pub enum Item {
    /// `--blockdev`: the arguments of a `blockdev-add`.
    Blockdev {
        /// The arguments.
        args: Map<String, Value>,
        /// From key=value text (values are strings to convert).
        keyval: bool,
    },
    /// `--nbd-server`: `NbdServerOptions` (flat address), run as `nbd-server-start`.
    NbdServer {
        /// The options.
        args: Map<String, Value>,
        /// From key=value text.
        keyval: bool,
    },
    /// `--object`: the arguments of an `object-add`.
    Object {
        /// The arguments.
        args: Map<String, Value>,
        /// From key=value text.
        keyval: bool,
    },
    /// `--export`: the arguments of a `block-export-add`.
    Export {
        /// The arguments.
        args: Map<String, Value>,
        /// From key=value text.
        keyval: bool,
    },
    /// `--chardev socket`.
    Chardev {
        /// The id monitors refer to.
        id: String,
        /// The address.
        listen: Listen,
        /// Wait for a client before going on with start-up.
        wait: bool,
    },
    /// `--monitor`.
    Monitor {
        /// The chardev id.
        chardev: String,
        /// Pretty-print replies.
        pretty: bool,
    },
}

/// A start-up error, naming the option.
#[derive(Debug, PartialEq, Eq)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err(option: &str, msg: impl std::fmt::Display) -> CliError {
    CliError(format!("--{option}: {msg}"))
}

const WITH_VALUE: &[&str] = &[
    "blockdev",
    "chardev",
    "monitor",
    "nbd-server",
    "export",
    "object",
    "pidfile",
    "trace",
    "log-level",
];

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Action, CliError> {
    let mut config = Config::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(Action::Help),
            "-V" | "--version" => return Ok(Action::Version),
            "--daemonize" => {
                config.daemonize = true;
                continue;
            }
            _ => {}
        }
        let arg = if arg == "-T" {
            "--trace".to_owned()
        } else {
            arg
        };
        let Some(long) = arg.strip_prefix("--") else {
            return Err(CliError(format!("Unexpected argument: {arg}")));
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v.to_owned())),
            None => (long, None),
        };
        if !WITH_VALUE.contains(&name) {
            return Err(CliError(format!("unrecognized option '{arg}'")));
        }
        let value = match inline.or_else(|| args.next()) {
            Some(v) => v,
            None => return Err(CliError(format!("option '--{name}' requires an argument"))),
        };
        if name == "trace" && matches!(value.as_str(), "help" | "enable=help") {
            return Ok(Action::TraceHelp);
        }
        apply(&mut config, name, &value)?;
    }
    crate::trace::check_patterns(&config.trace.patterns).map_err(|e| err("trace", e))?;
    Ok(Action::Run(config))
}

fn apply(config: &mut Config, name: &str, value: &str) -> Result<(), CliError> {
    match name {
        "blockdev" => {
            let (args, keyval) = keyval::parse_option(value, None).map_err(|e| err(name, e))?;
            config.items.push(Item::Blockdev { args, keyval });
        }
        "chardev" => config.items.push(chardev(value)?),
        "monitor" => config.items.push(monitor(value)?),
        "nbd-server" => {
            let (args, keyval) = keyval::parse_option(value, None).map_err(|e| err(name, e))?;
            config.items.push(Item::NbdServer { args, keyval });
        }
        "export" => {
            let (args, keyval) =
                keyval::parse_option(value, Some("type")).map_err(|e| err(name, e))?;
            config.items.push(Item::Export { args, keyval });
        }
        "object" => {
            let (args, keyval) =
                keyval::parse_option(value, Some("qom-type")).map_err(|e| err(name, e))?;
            let ty = args.get("qom-type").and_then(Value::as_str).unwrap_or("");
            if !crate::commands::object::TYPES.contains(&ty) {
                return Err(err(
                    name,
                    format!("object type '{ty}' is not supported by blockjobd"),
                ));
            }
            config.items.push(Item::Object { args, keyval });
        }
        "pidfile" => config.pidfile = Some(PathBuf::from(value)),
        "trace" => trace(config, value)?,
        "log-level" => {
            config.trace.level = crate::trace::parse_level(value).map_err(|e| err(name, e))?;
        }
        _ => return Err(CliError(format!("unrecognized option '--{name}'"))),
    }
    Ok(())
}

/// `--trace [[enable=]<pattern>][,events=<file>][,file=<file>]`.
fn trace(config: &mut Config, value: &str) -> Result<(), CliError> {
    let (mut m, _) = keyval::parse_option(value, Some("enable")).map_err(|e| err("trace", e))?;
    if let Some(p) = take_str(&mut m, "enable") {
        config.trace.patterns.push(p);
    }
    if let Some(events) = take_str(&mut m, "events") {
        let text = std::fs::read_to_string(&events)
            .map_err(|e| err("trace", format!("cannot read '{events}': {e}")))?;
        config.trace.patterns.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_owned),
        );
    }
    if let Some(file) = take_str(&mut m, "file") {
        config.trace.file = Some(PathBuf::from(file));
    }
    no_leftovers(&m, "trace")
}

fn take_str(m: &mut Map<String, Value>, key: &str) -> Option<String> {
    match m.remove(key) {
        Some(Value::String(s)) => Some(s),
        Some(other) => Some(other.to_string()),
        None => None,
    }
}

fn take_bool(
    m: &mut Map<String, Value>,
    key: &str,
    option: &str,
) -> Result<Option<bool>, CliError> {
    match take_str(m, key).as_deref() {
        None => Ok(None),
        Some("on" | "yes" | "true") => Ok(Some(true)),
        Some("off" | "no" | "false") => Ok(Some(false)),
        Some(other) => Err(err(
            option,
            format!("Parameter '{key}' expects 'on' or 'off', not '{other}'"),
        )),
    }
}

fn no_leftovers(m: &Map<String, Value>, option: &str) -> Result<(), CliError> {
    match m.keys().next() {
        Some(k) => Err(err(option, format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn chardev(value: &str) -> Result<Item, CliError> {
    let o = "chardev";
    let mut m = keyval::parse(value, Some("backend")).map_err(|e| err(o, e))?;
    let backend = take_str(&mut m, "backend").unwrap_or_default();
    if backend != "socket" {
        return Err(err(
            o,
            format!("chardev backend '{backend}' is not supported (only 'socket')"),
        ));
    }
    let id = take_str(&mut m, "id").ok_or_else(|| err(o, "Parameter 'id' is missing"))?;
    if take_bool(&mut m, "server", o)? != Some(true) {
        return Err(err(
            o,
            "only server=on sockets are supported: blockjobd listens",
        ));
    }
    let wait = take_bool(&mut m, "wait", o)?.unwrap_or(true);
    let listen = match (
        take_str(&mut m, "path"),
        take_str(&mut m, "host"),
        take_str(&mut m, "port"),
    ) {
        (Some(p), None, None) => Listen::Unix(PathBuf::from(p)),
        (None, host, Some(port)) => {
            let port = port.parse().map_err(|_| {
                err(
                    o,
                    format!("Parameter 'port' expects a port number, not '{port}'"),
                )
            })?;
            Listen::Tcp(host.unwrap_or_else(|| "0.0.0.0".into()), port)
        }
        _ => return Err(err(o, "give either path=, or host= and port=")),
    };
    no_leftovers(&m, o)?;
    Ok(Item::Chardev { id, listen, wait })
}

fn monitor(value: &str) -> Result<Item, CliError> {
    let o = "monitor";
    let mut m = keyval::parse(value, Some("chardev")).map_err(|e| err(o, e))?;
    let chardev =
        take_str(&mut m, "chardev").ok_or_else(|| err(o, "Parameter 'chardev' is missing"))?;
    if let Some(mode) = take_str(&mut m, "mode") {
        if mode != "control" {
            return Err(err(
                o,
                format!("mode '{mode}' is not supported (only 'control')"),
            ));
        }
    }
    let pretty = take_bool(&mut m, "pretty", o)?.unwrap_or(false);
    m.remove("id");
    no_leftovers(&m, o)?;
    Ok(Item::Monitor { chardev, pretty })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Result<Config, CliError> {
        match parse(args.iter().map(|s| (*s).to_owned()))? {
            Action::Run(c) => Ok(c),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn trace_and_log_level() {
        let c = run(&[
            "-T",
            "qmp*",
            "--trace",
            "enable=job*,file=/tmp/t.log",
            "--log-level",
            "info",
        ])
        .expect("ok");
        assert_eq!(c.trace.patterns, ["qmp*", "job*"]);
        assert_eq!(c.trace.file, Some(PathBuf::from("/tmp/t.log")));
        assert_eq!(c.trace.level, tracing::Level::INFO);
        assert!(matches!(
            parse(["--trace".to_owned(), "help".to_owned()]),
            Ok(Action::TraceHelp)
        ));
        let e = run(&["--trace", "bdrv_co_pwritev"]).expect_err("QEMU's event");
        assert!(
            e.0.starts_with("--trace: trace pattern 'bdrv_co_pwritev' matches none"),
            "{e}"
        );
        let e = run(&["--trace", "qmp*,bogus=1"]).expect_err("bad key");
        assert_eq!(e.0, "--trace: Parameter 'bogus' is unexpected");
        let e = run(&["--log-level", "loud"]).expect_err("bad level");
        assert!(e.0.starts_with("--log-level: log level 'loud'"), "{e}");
    }

    #[test]
    fn qsd_command_line() {
        let c = run(&[
            "--blockdev",
            "driver=file,node-name=f,filename=a,,b.img",
            "--chardev",
            "socket,id=m,path=/tmp/q.sock,server=on,wait=off",
            "--monitor=chardev=m,pretty=on",
            "--pidfile",
            "/tmp/p",
            "--daemonize",
        ])
        .expect("ok");
        assert!(c.daemonize);
        assert_eq!(c.items.len(), 3);
        match &c.items[0] {
            Item::Blockdev { args, keyval } => {
                assert!(keyval);
                assert_eq!(args["filename"], "a,b.img");
            }
            other => panic!("{other:?}"),
        }
        match &c.items[1] {
            Item::Chardev { id, listen, wait } => {
                assert_eq!(id, "m");
                assert_eq!(listen, &Listen::Unix("/tmp/q.sock".into()));
                assert!(!wait);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&c.items[2], Item::Monitor { pretty: true, .. }));
    }

    #[test]
    fn the_thread_count_comes_from_its_variable() {
        assert_eq!(threads(None), 1);
        assert_eq!(threads(Some("4")), 4);
        assert_eq!(threads(Some(" 0 ")), 0);
        assert_eq!(threads(Some("many")), 1);
        assert_eq!(threads(Some("-1")), 1);
    }

    #[test]
    fn errors_name_the_option() {
        let e = run(&["--chardev", "socket,id=m,path=x,server=off"]).expect_err("client");
        assert!(e.0.starts_with("--chardev: "), "{e}");
        let e = run(&["--object", "secret,id=s,data=x"]).expect_err("object");
        assert_eq!(
            e.0,
            "--object: object type 'secret' is not supported by blockjobd"
        );
        assert!(run(&["--bogus"]).is_err());
        assert!(run(&["--blockdev"]).is_err());
        assert!(run(&["--monitor", "chardev=m,mode=readline"]).is_err());
        let e = run(&["--export", "nbd,id"]).expect_err("nbd");
        assert!(e.0.starts_with("--export: "), "{e}");
    }
}
