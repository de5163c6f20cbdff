//! `blockjob`: the offline image tool (and, from Step 2 on, the client of `blockjobd`).
//!
//! Commands: `info`, `create`, `map`, `copy`, `bench`, `demo`. Each opens images through the same block
//! layer and drivers the daemon uses.

mod bench;
mod copy;
mod demo;
mod image;
mod live;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use block::{BlockError, Result};
use clap::{Parser, Subcommand};
use drivers::Format;

#[derive(Parser, Debug)]
#[command(
    name = "blockjob",
    version,
    about = "Live block jobs on virtual disks: offline image tool and client"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Show an image's format, sizes and format-specific facts (like `qemu-img info`).
    Info {
        /// Image file.
        image: PathBuf,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Print JSON, shaped like `qemu-img info --output=json`.
        #[arg(long)]
        json: bool,
    },
    /// Create an image (like `qemu-img create`).
    Create {
        /// Format: raw or qcow2.
        #[arg(short = 'f', long = "format", default_value = "raw")]
        format: String,
        /// Backing file (qcow2).
        #[arg(short = 'b', long = "backing")]
        backing: Option<String>,
        /// Backing file format.
        #[arg(short = 'F', long = "backing-format")]
        backing_format: Option<String>,
        /// qcow2 options: cluster_size, refcount_bits, compat (0.10|1.1), preallocation
        /// (off|metadata), compression_type (zlib|zstd), lazy_refcounts (on|off).
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        /// Image file.
        image: PathBuf,
        /// Virtual size (k, M, G, T suffixes); defaults to the backing file's size.
        size: Option<String>,
    },
    /// Show the allocation map (same ranges as `qemu-img map`).
    Map {
        /// Image file.
        image: PathBuf,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Print JSON, the same as `qemu-img map --output=json`.
        #[arg(long)]
        json: bool,
    },
    /// Copy an image into a new one, keeping it sparse (like `qemu-img convert`).
    Copy {
        /// Source image.
        src: PathBuf,
        /// Destination image (created, overwritten if it exists).
        dst: PathBuf,
        /// Source format (probed when omitted).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Output format: raw or qcow2.
        #[arg(short = 'O', long = "output-format", default_value = "raw")]
        output_format: String,
        /// qcow2 creation options of the destination (see `create -o`).
        #[arg(short = 'o', long = "options")]
        options: Vec<String>,
        /// Parallel copy workers.
        #[arg(short = 'm', long = "workers", default_value_t = 8)]
        workers: usize,
        /// Open both images with O_DIRECT (cache.direct=on; the same as `-t none`).
        #[arg(long)]
        direct: bool,
        /// Cache mode of the destination: writeback (flushed at the end), none (O_DIRECT) or
        /// unsafe (never flushed, qemu-img convert's default).
        #[arg(short = 't', long = "cache", default_value = "writeback")]
        cache: String,
        /// Write compressed clusters (qcow2 output).
        #[arg(short = 'c', long)]
        compress: bool,
        /// Show progress (default: when stderr is a terminal).
        #[arg(short = 'p', long)]
        progress: bool,
    },
    /// Time a stream of requests on an image (the same options and output as `qemu-img bench`).
    Bench {
        /// Image file.
        image: PathBuf,
        /// Image format (probed when omitted).
        #[arg(short = 'f', long = "format")]
        format: Option<String>,
        /// Cache mode: writeback, none or unsafe.
        #[arg(short = 't', long = "cache", default_value = "writeback")]
        cache: String,
        /// Number of requests.
        #[arg(short = 'c', long = "count", default_value_t = 75000)]
        count: u64,
        /// Requests in flight at once.
        #[arg(short = 'd', long = "depth", default_value_t = 64)]
        depth: usize,
        /// Offset of the first request.
        #[arg(short = 'o', long = "offset", default_value = "0")]
        offset: String,
        /// Bytes per request.
        #[arg(short = 's', long = "buffer-size", default_value = "4k")]
        buffer_size: String,
        /// Offset increment between requests (default: the buffer size).
        #[arg(short = 'S', long = "step-size")]
        step: Option<String>,
        /// Write instead of read.
        #[arg(short = 'w', long = "write")]
        write: bool,
        /// Byte to write (default 0).
        #[arg(long = "pattern", default_value_t = 0)]
        pattern: u8,
        /// Flush after this many requests.
        #[arg(long = "flush-interval", default_value_t = 0)]
        flush_interval: u64,
        /// Flush without waiting for the requests in flight.
        #[arg(long = "no-drain")]
        no_drain: bool,
    },
    /// Run the built-in demo: a live backup while a writer runs. A disk, the daemon in this
    /// process, the disk exported over NBD, a writer changing it; a full backup with a new
    /// bitmap, then an incremental one, each verified against the disk at its point in time.
    Demo {
        /// Size of the demo disk (default 256M; 512M with --offline).
        #[arg(long)]
        size: Option<String>,
        /// Keep the files (printed at the end).
        #[arg(long)]
        keep: bool,
        /// The offline demo instead: copy a disk with the copy engine and verify the copy.
        #[arg(long)]
        offline: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("blockjob: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blockjob: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Info {
            image,
            format,
            json,
        } => {
            let node =
                image::open(&image, format.as_deref(), true, image::Cache::default()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&image::info_json(&node)).unwrap_or_default()
                );
            } else {
                print!("{}", image::info_text(&node));
            }
            node.close().await
        }
        Command::Create {
            format,
            backing,
            backing_format,
            options,
            image,
            size,
        } => {
            let fmt = Format::parse(&format)?;
            let size = match (&size, &backing) {
                (Some(s), _) => image::parse_size(s)?,
                (None, Some(b)) => {
                    let bpath = drivers::open::resolve_backing(&image, b);
                    let node = image::open(
                        &bpath,
                        backing_format.as_deref(),
                        true,
                        image::Cache::default(),
                    )
                    .await?;
                    let len = node.len();
                    node.close().await?;
                    len
                }
                (None, None) => {
                    return Err(BlockError::invalid("Image creation needs a size parameter"))
                }
            };
            let qopts = match fmt {
                Format::Qcow2 => {
                    let mut o = image::qcow2_options(size, &options)?;
                    o.backing_file = backing;
                    o.backing_format = backing_format;
                    Some(o)
                }
                Format::Raw if backing.is_some() => {
                    return Err(BlockError::unsupported("raw images have no backing file"))
                }
                Format::Raw => None,
            };
            image::create(&image, fmt, size, qopts).await?;
            println!(
                "Formatting '{}', fmt={} size={size}",
                image.display(),
                fmt.name()
            );
            Ok(())
        }
        Command::Map {
            image,
            format,
            json,
        } => {
            let node =
                image::open(&image, format.as_deref(), true, image::Cache::default()).await?;
            let out = if json {
                image::map_json(&node).await?
            } else {
                image::map_text(&node).await?
            };
            println!("{out}");
            node.close().await
        }
        Command::Copy {
            src,
            dst,
            format,
            output_format,
            options,
            workers,
            direct,
            cache,
            compress,
            progress,
        } => {
            // `-t` is the destination's cache mode, as in qemu-img; `--direct` covers both.
            let mut cache = image::Cache::parse(&cache)?;
            cache.direct |= direct;
            let src_cache = image::Cache {
                direct,
                no_flush: false,
            };
            let src_node = image::open(&src, format.as_deref(), true, src_cache).await?;
            let fmt = Format::parse(&output_format)?;
            let size = src_node.len();
            let qopts = match fmt {
                Format::Qcow2 => Some(image::qcow2_options(size, &options)?),
                Format::Raw => None,
            };
            image::create(&dst, fmt, size, qopts).await?;
            let dst_node = image::open(&dst, Some(fmt.name()), false, cache).await?;
            let progress = progress || std::io::stderr().is_terminal();
            let stats = copy::copy(
                src_node.clone(),
                dst_node.clone(),
                &copy::CopyOptions {
                    workers,
                    compress,
                    progress,
                },
            )
            .await?;
            dst_node.close().await?;
            src_node.close().await?;
            let secs = stats.elapsed.as_secs_f64().max(1e-9);
            eprintln!(
                "copied {} of data, skipped {} of zeroes in {:.2}s ({:.1} MiB/s of disk)",
                image::human(stats.copied),
                image::human(stats.skipped),
                secs,
                size as f64 / secs / f64::from(1 << 20)
            );
            Ok(())
        }
        Command::Bench {
            image,
            format,
            cache,
            count,
            depth,
            offset,
            buffer_size,
            step,
            write,
            pattern,
            flush_interval,
            no_drain,
        } => {
            let cache = image::Cache::parse(&cache)?;
            let buffer_size = image::parse_size(&buffer_size)?;
            let opts = bench::BenchOptions {
                count,
                depth,
                offset: image::parse_size(&offset)?,
                buffer_size,
                step: step
                    .as_deref()
                    .map(image::parse_size)
                    .transpose()?
                    .unwrap_or(buffer_size),
                write,
                pattern,
                flush_interval,
                no_drain,
            };
            let node = image::open(&image, format.as_deref(), !write, cache).await?;
            println!("{}", opts.describe());
            let result = bench::run(&node, &opts).await;
            let closed = node.close().await;
            let elapsed = result?;
            closed?;
            println!("Run completed in {:.3} seconds.", elapsed.as_secs_f64());
            Ok(())
        }
        Command::Demo {
            size,
            keep,
            offline,
        } => {
            let default = if offline { "512M" } else { "256M" };
            let size = image::parse_size(size.as_deref().unwrap_or(default))?;
            if offline {
                demo::run(size).await
            } else {
                live::run(size, keep).await
            }
        }
    }
}
