//! The `blockjobd` binary: parses qemu-storage-daemon's options and runs the daemon.

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

use daemon::cli::{self, Action};

fn main() {
    let action = match cli::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("blockjobd: {e}");
            std::process::exit(1);
        }
    };
    let status = match action {
        Action::Help => {
            print!("{}", cli::HELP);
            0
        }
        Action::Version => {
            println!(
                "blockjobd version {} (compatible with qemu-storage-daemon {}.{}.{})",
                env!("CARGO_PKG_VERSION"),
                qmp::message::QEMU_VERSION.0,
                qmp::message::QEMU_VERSION.1,
                qmp::message::QEMU_VERSION.2
            );
            0
        }
        Action::TraceHelp => {
            print!("{}", daemon::trace::help());
            0
        }
        Action::Run(mut config) => {
            config.io = cli::io_tuning_from_env();
            run(config)
        }
    };
    std::process::exit(status);
}

fn run(config: cli::Config) -> i32 {
    if let Err(e) = daemon::trace::init(&config.trace) {
        eprintln!("blockjobd: {e}");
        return 1;
    }
    let notify = if config.daemonize {
        match daemonize() {
            Ok(fd) => Some(fd),
            Err(e) => {
                eprintln!("blockjobd: --daemonize: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    let threads = cli::threads_from_env();
    let mut builder = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockjobd: cannot start the runtime: {e}");
            return 1;
        }
    };
    runtime.block_on(daemon::server::run(config, move || {
        if let Some(fd) = notify {
            detach(fd);
        }
    }))
}

/// Forks. The parent waits until the child reports a successful start-up (one byte on a
/// pipe) and exits 0, or exits 1 when the child fails first; the child returns the pipe's
/// write end. Called before any thread exists.
fn daemonize() -> std::io::Result<OwnedFd> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe(2) succeeded, so both descriptors are open and owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (no runtime yet), so fork is sound.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            Ok(write_end)
        }
        _child => {
            drop(write_end);
            let mut file = std::fs::File::from(read_end);
            let mut byte = [0u8; 1];
            let ok = matches!(file.read(&mut byte), Ok(1) if byte[0] == b'0');
            std::process::exit(if ok { 0 } else { 1 });
        }
    }
}

/// Tells the waiting parent that start-up succeeded and drops the terminal.
fn detach(fd: OwnedFd) {
    use std::io::Write;
    let mut pipe = std::fs::File::from(fd);
    let _ = pipe.write_all(b"0");
    drop(pipe);
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for target in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors; `null` stays open for the call.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}
