//! The daemon's named nodes: opening them from `blockdev-add` options, deleting them, closing
//! everything at shutdown.
//!
//! Children given inline (`file: {…}`) become implicit nodes named `#blockNNN`, owned by their
//! parent, and go away with it; children given by name (`file: "f0"`) are shared. Opening is
//! all-or-nothing: a failure closes every node the command had opened so far.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use block::{BlockDriver, BlockError, BlockNode, Child, ChildRole, EdgePerm, EdgeSpec};
use block::{Parent, PermPolicy};
use drivers::blkdebug::{BlkdebugDriver, DebugEvent, InjectError, IoType, Limits, SetState};
use drivers::file::{FileDriver, FileOptions};
use drivers::nbd::NbdDriver;
use drivers::null::{NullDriver, DEFAULT_NULL_SIZE};
use drivers::qcow2::{self, Qcow2Driver};
use drivers::raw::RawDriver;
use filters::{CbwOptions, CopyBeforeWrite, OnCbwError, SnapshotAccess};
use nbd::ConnectTo;
use qmp::{QmpError, QmpResult};
use serde_json::{json, Map, Value};

use crate::commands::blockdev_add::{BlockdevOptions, BlockdevRef, InjectRule, NbdServer};
use crate::filename::{NameRecipe, NodeFileName};

/// Longest node-name QEMU accepts is 31 bytes.
const MAX_NODE_NAME: usize = 31;

/// Deepest backing chain opened from image headers.
const MAX_CHAIN: usize = 64;

/// The cache mode of a node (`cache.direct`, `cache.no-flush`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheMode {
    /// O_DIRECT.
    pub direct: bool,
    /// Flushes are ignored.
    pub no_flush: bool,
}

/// A named node and what the queries report about it.
#[derive(Debug)]
pub struct NodeEntry {
    /// The node.
    pub node: Arc<BlockNode>,
    /// Created by `blockdev-add` at top level (only those can be deleted by the user).
    pub monitor_owned: bool,
    /// Opened read-only.
    pub read_only: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// How the node's file name is made (see [`Nodes::file_name`]).
    pub recipe: NameRecipe,
    /// The host file under the node, for `actual-size`.
    pub host_file: Option<PathBuf>,
    /// Creation order.
    pub seq: u64,
    /// The copy-before-write driver of a copy-before-write node.
    pub cbw: Option<Arc<CopyBeforeWrite>>,
}

/// All named nodes.
#[derive(Debug, Default)]
pub struct Nodes {
    /// How file nodes do host I/O (the daemon's settings).
    pub io: drivers::file::IoTuning,
    /// `throttle-group` objects, by id (`object-add`).
    pub throttle_groups: BTreeMap<String, Arc<drivers::throttle::ThrottleGroup>>,
    entries: BTreeMap<String, NodeEntry>,
    seq: u64,
    auto_names: u64,
    /// Names of nodes a job created and has let go of (its filter, once removed); they leave
    /// the registry before the next command runs.
    released: Arc<std::sync::Mutex<Vec<String>>>,
}

/// Options children inherit from their parent unless they set them.
#[derive(Clone, Copy, Debug, Default)]
struct Inherited {
    read_only: bool,
    auto_read_only: bool,
    cache: CacheMode,
    discard_unmap: bool,
}

/// Nodes opened by one command so far, closed again if the command fails.
#[derive(Debug, Default)]
struct Opening {
    created: Vec<String>,
    chain: Vec<PathBuf>,
    /// Listing positions taken by formats before their backing files open (QEMU names a
    /// format node after its file and before its backing chain, and lists newest first).
    positions: BTreeMap<String, u64>,
}

/// QEMU's op blocker: refuses a node a job holds.
pub(crate) fn refuse_busy(node: &BlockNode) -> QmpResult<()> {
    let kind = node.parents().iter().find_map(|c| match c.parent() {
        Parent::Job { kind, .. } => Some(kind),
        _ => None,
    });
    match kind {
        Some(kind) => Err(QmpError::generic(format!(
            "Node '{}' is busy: block device is in use by block job: {kind}",
            node.name()
        ))),
        None => Ok(()),
    }
}

/// The text of a block error as QEMU prints it (strerror without Rust's "(os error N)").
pub fn error_text(e: &BlockError) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_owned(),
        _ => s,
    }
}

fn generic(e: BlockError) -> QmpError {
    QmpError::generic(error_text(&e))
}

/// QEMU's node-name rules: a letter first, then letters, digits, `-`, `.`, `_`; at most 31.
pub fn check_node_name(name: &str) -> QmpResult<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    {
        return Err(QmpError::generic(format!("Invalid node-name: '{name}'")));
    }
    if name.len() > MAX_NODE_NAME {
        return Err(QmpError::generic("Node name too long"));
    }
    Ok(())
}

impl Nodes {
    /// Entries, newest first (the order QEMU lists them).
    pub fn newest_first(&self) -> Vec<(&String, &NodeEntry)> {
        let mut v: Vec<_> = self.entries.iter().collect();
        v.sort_by_key(|(_, e)| std::cmp::Reverse(e.seq));
        v
    }

    /// Registers a node a job created (a backup's filter), shown like an implicit node until
    /// the job calls the returned function as it lets go of it.
    pub fn add_job_node(
        &mut self,
        node: Arc<BlockNode>,
        recipe: NameRecipe,
        cbw: Option<Arc<CopyBeforeWrite>>,
    ) -> impl FnOnce() + Send + 'static {
        let name = node.name().to_owned();
        self.seq += 1;
        self.entries.insert(
            name.clone(),
            NodeEntry {
                node,
                monitor_owned: false,
                read_only: false,
                cache: CacheMode::default(),
                recipe,
                host_file: None,
                seq: self.seq,
                cbw,
            },
        );
        let released = self.released.clone();
        move || {
            released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(name)
        }
    }

    /// A hook that takes `names` out of the registry before the next command (nodes a job
    /// opened for itself and has closed).
    pub fn releaser(&self, names: Vec<String>) -> impl FnOnce() + Send + 'static {
        let released = self.released.clone();
        move || {
            released
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(names)
        }
    }

    /// Opens a node tree for a job (`drive-backup`'s target), named automatically unless
    /// `opts` names it and not owned by the monitor. Returns the nodes opened, parents last;
    /// on failure, what was opened is closed again.
    pub async fn open_for_job(&mut self, opts: &BlockdevOptions) -> QmpResult<Vec<Arc<BlockNode>>> {
        let mut opening = Opening::default();
        match self
            .open(opts, Inherited::default(), &mut opening, false)
            .await
        {
            Ok(_) => Ok(opening
                .created
                .iter()
                .filter_map(|n| self.entries.get(n).map(|e| e.node.clone()))
                .collect()),
            Err(e) => {
                for name in opening.created.iter().rev() {
                    self.close_and_remove(name).await;
                }
                Err(e)
            }
        }
    }

    /// Closes a node a job had opened (and its children nobody else uses) when the job could
    /// not be created.
    pub async fn close_job_node(&mut self, name: &str) {
        self.close_and_remove(name).await;
    }

    /// Drops the nodes jobs have let go of.
    pub fn prune(&mut self) {
        let names: Vec<String> =
            std::mem::take(&mut *self.released.lock().unwrap_or_else(|p| p.into_inner()));
        for name in names {
            self.entries.remove(&name);
        }
    }

    /// A fresh `#blockNNN` name for a node a command creates.
    pub fn new_auto_name(&mut self) -> String {
        self.auto_name()
    }

    /// The entry of the node named `name`.
    pub fn entry(&self, name: &str) -> Option<&NodeEntry> {
        self.entries.get(name)
    }

    /// The entry whose node is `node`.
    pub fn entry_of(&self, node: &Arc<BlockNode>) -> Option<&NodeEntry> {
        self.entries.get(node.name())
    }

    /// `blockdev-add` with checked options.
    pub async fn add(&mut self, opts: &BlockdevOptions) -> QmpResult<()> {
        if opts.node_name.is_none() {
            return Err(QmpError::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let mut opening = Opening::default();
        match self
            .open(opts, Inherited::default(), &mut opening, true)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                for name in opening.created.iter().rev() {
                    self.close_and_remove(name).await;
                }
                Err(e)
            }
        }
    }

    fn open<'a>(
        &'a mut self,
        opts: &'a BlockdevOptions,
        inherit: Inherited,
        opening: &'a mut Opening,
        monitor_owned: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = QmpResult<Arc<BlockNode>>> + Send + 'a>>
    {
        Box::pin(async move {
            let name = match opts.node_name.as_deref() {
                Some(n) => {
                    check_node_name(n)?;
                    n.to_owned()
                }
                None => self.auto_name(),
            };
            if self.entries.contains_key(&name) {
                return Err(QmpError::generic(format!(
                    "Duplicate nodes with node-name='{name}'"
                )));
            }
            let cache = opts.cache.clone().unwrap_or_default();
            let own = Inherited {
                read_only: opts.read_only.unwrap_or(inherit.read_only),
                auto_read_only: opts.auto_read_only.unwrap_or(inherit.auto_read_only),
                cache: CacheMode {
                    direct: cache.direct.unwrap_or(inherit.cache.direct),
                    no_flush: cache.no_flush.unwrap_or(inherit.cache.no_flush),
                },
                discard_unmap: opts
                    .discard
                    .as_deref()
                    .map_or(inherit.discard_unmap, |d| d == "unmap"),
            };
            let detect_zeroes =
                match opts.detect_zeroes.as_deref() {
                    Some("on") => block::DetectZeroes::On,
                    Some("unmap") if !own.discard_unmap => return Err(QmpError::generic(
                        "setting detect-zeroes to unmap is not allowed without setting discard \
                         operation to unmap",
                    )),
                    Some("unmap") => block::DetectZeroes::Unmap,
                    _ => block::DetectZeroes::Off,
                };
            let driver = opts.driver.clone();
            let parent = &name;
            let opened = match driver.as_str() {
                "file" => self.open_file(opts, own)?,
                "null-co" | "null-aio" => open_null(opts, own),
                "raw" => self.open_raw(opts, own, parent, opening).await?,
                "qcow2" => self.open_qcow2(opts, own, parent, opening).await?,
                "blkdebug" => {
                    self.open_blkdebug(opts, own, parent, opening, monitor_owned)
                        .await?
                }
                "copy-before-write" => self.open_cbw(opts, own, parent, opening).await?,
                "throttle" => self.open_throttle(opts, own, parent, opening).await?,
                "snapshot-access" => {
                    self.open_snapshot_access(opts, own, parent, opening)
                        .await?
                }
                "nbd" => open_nbd(opts, own).await?,
                other => {
                    return Err(QmpError::generic(format!(
                        "Parameter 'driver' does not accept value '{other}'"
                    )))
                }
            };
            let node = match opened.node {
                Some(node) => node,
                None => BlockNode::new(name.clone(), opened.driver),
            };
            node.set_discard_ignored(!own.discard_unmap);
            node.set_detect_zeroes(detect_zeroes);
            if let Err(e) = node.load_persistent_bitmaps().await {
                let _ = node.close().await;
                return Err(QmpError::generic(format!(
                    "Could not load the dirty bitmaps of '{name}': {}",
                    error_text(&e)
                )));
            }
            let seq = match opening.positions.remove(&name) {
                Some(seq) => seq,
                None => {
                    self.seq += 1;
                    self.seq
                }
            };
            self.entries.insert(
                name.clone(),
                NodeEntry {
                    node: node.clone(),
                    monitor_owned,
                    read_only: opened.read_only,
                    cache: own.cache,
                    recipe: opened.recipe,
                    host_file: opened.host_file,
                    seq,
                    cbw: opened.cbw,
                },
            );
            opening.created.push(name);
            Ok(node)
        })
    }

    /// Gives the node being opened as `name` its place in the listing now, before the
    /// children it opens next (QEMU names a node after its `file` and before the rest).
    fn take_position(&mut self, name: &str, opening: &mut Opening) {
        self.seq += 1;
        opening.positions.insert(name.to_owned(), self.seq);
    }

    fn auto_name(&mut self) -> String {
        loop {
            let name = format!("#block{:03}", self.auto_names);
            self.auto_names += 1;
            if !self.entries.contains_key(&name) {
                return name;
            }
        }
    }

    fn open_file(&self, opts: &BlockdevOptions, own: Inherited) -> QmpResult<Opened> {
        let filename = opts.filename.as_deref().unwrap_or_default();
        // `auto` is `on`: Linux has OFD locks.
        let locking = opts.locking.as_deref() != Some("off");
        let aio = match opts.aio.as_deref() {
            Some("threads") => Some(drivers::file::Aio::Threads),
            Some("io_uring") => Some(drivers::file::Aio::IoUring),
            _ => None,
        };
        let options = |read_only| FileOptions {
            filename: PathBuf::from(filename),
            read_only,
            direct: own.cache.direct,
            no_flush: own.cache.no_flush,
            locking,
            aio,
            io: self.io,
        };
        let (driver, read_only) = match FileDriver::open(options(own.read_only)) {
            Ok(d) => (d, own.read_only),
            Err(e) if own.auto_read_only && e.kind() == block::ErrorKind::ReadOnly => {
                (FileDriver::open(options(true)).map_err(generic)?, true)
            }
            Err(e) => return Err(generic(e)),
        };
        let options = json_map(json!({"driver": "file", "filename": filename}));
        Ok(Opened {
            driver: Arc::new(driver),
            read_only,
            recipe: NameRecipe::Fixed(NodeFileName::protocol(Some(filename.to_owned()), options)),
            host_file: Some(PathBuf::from(filename)),
            node: None,
            cbw: None,
        })
    }

    /// A child given by name or inline, attached to the node `parent` being opened: what the
    /// parent needs of it (by `spec`'s policy, for a parent nobody uses yet) must be
    /// compatible with the child's other parents, its writability and its image locks.
    async fn child(
        &mut self,
        value: Option<&BlockdevRef>,
        spec: EdgeSpec,
        parent_writable: bool,
        inherit: Inherited,
        opening: &mut Opening,
    ) -> QmpResult<Arc<Child>> {
        let node = match value {
            Some(BlockdevRef::Name(name)) => self
                .entries
                .get(name)
                .map(|e| e.node.clone())
                .ok_or_else(|| {
                    QmpError::generic(format!(
                        "Cannot find device='{name}' nor node-name='{name}'"
                    ))
                })?,
            Some(BlockdevRef::Inline(m)) => self.open(m, inherit, opening, false).await?,
            None => return Err(QmpError::generic("Invalid child reference")),
        };
        let need = spec
            .policy
            .child_perm(parent_writable, false, EdgePerm::FREE);
        Child::attach(spec, node, need).map_err(generic)
    }

    /// The child under `key` of a format or filter node named `parent`, with its naming and
    /// host file.
    async fn format_child(
        &mut self,
        value: Option<&BlockdevRef>,
        key: &'static str,
        spec: EdgeSpec,
        own: Inherited,
        opening: &mut Opening,
    ) -> QmpResult<(Arc<Child>, Option<PathBuf>)> {
        let child = self
            .child(value, spec.named(key), !own.read_only, own, opening)
            .await?;
        let host_file = self
            .entries
            .get(child.node().name())
            .and_then(|e| e.host_file.clone());
        Ok((child, host_file))
    }

    /// How QEMU names `node` now, from its own options and its children's names.
    pub fn naming(&self, node: &BlockNode) -> NodeFileName {
        match self.entries.get(node.name()) {
            Some(e) => e.recipe.resolve(node, &|child| self.naming(child)),
            None => NodeFileName::filter(node.name().to_owned(), Map::new()),
        }
    }

    /// The file name the queries show for `node`.
    pub fn file_name(&self, node: &BlockNode) -> String {
        self.naming(node).shown()
    }

    async fn open_raw(
        &mut self,
        opts: &BlockdevOptions,
        own: Inherited,
        parent: &str,
        opening: &mut Opening,
    ) -> QmpResult<Opened> {
        // With an offset or a size, raw holds data; without, it passes its users' needs on.
        let policy = if opts.offset.is_some() || opts.size.is_some() {
            PermPolicy::Data
        } else {
            PermPolicy::Filtered
        };
        let spec = EdgeSpec::new(ChildRole::File, Parent::Node(parent.into())).policy(policy);
        let (file, host_file) = self
            .format_child(opts.file.as_ref(), "file", spec, own, opening)
            .await?;
        let driver = RawDriver::new(file, opts.offset.unwrap_or(0), opts.size, !own.read_only)
            .map_err(generic)?;
        // `offset` and `size` change what the node is: QEMU then names it by its options.
        let mut strong = Map::new();
        if let Some(offset) = opts.offset {
            strong.insert("offset".into(), json!(offset));
        }
        if let Some(size) = opts.size {
            strong.insert("size".into(), json!(size));
        }
        Ok(Opened {
            driver: Arc::new(driver),
            read_only: own.read_only,
            recipe: NameRecipe::Format {
                driver: "raw",
                strong,
                backed: false,
                auto_backing: None,
            },
            host_file,
            node: None,
            cbw: None,
        })
    }

    async fn open_qcow2(
        &mut self,
        opts: &BlockdevOptions,
        own: Inherited,
        parent: &str,
        opening: &mut Opening,
    ) -> QmpResult<Opened> {
        let spec = EdgeSpec::new(ChildRole::File, Parent::Node(parent.into()));
        let (file, host_file) = self
            .format_child(opts.file.as_ref(), "file", spec, own, opening)
            .await?;
        // Backing file names in the header are relative to the image's own file.
        let image_path = host_file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| self.file_name(&file.node()));
        let header = qcow2::read_header(&file).await.map_err(generic)?;
        self.take_position(parent, opening);
        let backing_inherit = Inherited {
            read_only: true,
            ..own
        };
        let backing_spec = EdgeSpec::new(ChildRole::Backing, Parent::Node(parent.into()));
        let backing = match &opts.backing {
            Some(None) => None,
            Some(Some(reference)) => Some(
                self.child(
                    Some(reference),
                    backing_spec,
                    !own.read_only,
                    backing_inherit,
                    opening,
                )
                .await?,
            ),
            None => match &header.backing_file {
                None => None,
                Some(b) => {
                    let node = self
                        .open_backing_from_header(
                            &image_path,
                            b,
                            header.backing_format.as_deref(),
                            backing_inherit,
                            opening,
                        )
                        .await?;
                    let need =
                        backing_spec
                            .policy
                            .child_perm(!own.read_only, false, EdgePerm::FREE);
                    let edge = Child::attach(backing_spec, node, need).map_err(|e| {
                        QmpError::generic(format!(
                            "Could not open backing file: {}",
                            error_text(&e)
                        ))
                    })?;
                    Some(edge)
                }
            },
        };
        // QEMU's `auto_backing_file`: a backing file opened from the header is named as it
        // opened; otherwise the header's text, which a given backing node may not match.
        let auto_backing = match (&opts.backing, &backing) {
            (None, Some(edge)) => Some(self.file_name(&edge.node())),
            _ => header.backing_file.clone(),
        };
        let driver = Qcow2Driver::open(file, !own.read_only, backing)
            .await
            .map_err(generic)?;
        Ok(Opened {
            driver: Arc::new(driver),
            read_only: own.read_only,
            recipe: NameRecipe::Format {
                driver: "qcow2",
                strong: Map::new(),
                backed: true,
                auto_backing,
            },
            host_file,
            node: None,
            cbw: None,
        })
    }

    /// Opens the backing file an image header names, as implicit nodes, following its chain.
    async fn open_backing_from_header(
        &mut self,
        image: &str,
        backing: &str,
        format: Option<&str>,
        inherit: Inherited,
        opening: &mut Opening,
    ) -> QmpResult<Arc<BlockNode>> {
        let path = drivers::open::resolve_backing(Path::new(image), backing);
        let canonical = std::fs::canonicalize(&path).map_err(|e| {
            let e = BlockError::io(format!("Could not open '{}'", path.display()), e);
            QmpError::generic(format!("Could not open backing file: {}", error_text(&e)))
        })?;
        if opening.chain.contains(&canonical) || opening.chain.len() >= MAX_CHAIN {
            return Err(QmpError::generic(format!(
                "Could not open backing file: backing file '{}' forms a loop or a chain deeper than {MAX_CHAIN}",
                path.display()
            )));
        }
        opening.chain.push(canonical);
        let format = match format {
            Some(f @ ("raw" | "qcow2")) => f.to_owned(),
            Some(other) => {
                return Err(QmpError::generic(format!(
                    "Could not open backing file: unknown backing format '{other}'"
                )))
            }
            None => probe(&path).await?,
        };
        let opts: BlockdevOptions = serde_json::from_value(json!({
            "driver": format,
            "file": {"driver": "file", "filename": path.display().to_string()},
        }))
        .map_err(|e| QmpError::generic(format!("internal: backing options: {e}")))?;
        self.open(&opts, inherit, opening, false)
            .await
            .map_err(|e| QmpError::generic(format!("Could not open backing file: {}", e.desc)))
    }

    /// `blkdebug`; `top`: the node `blockdev-add` names, not a child given inline.
    async fn open_blkdebug(
        &mut self,
        opts: &BlockdevOptions,
        own: Inherited,
        parent: &str,
        opening: &mut Opening,
        top: bool,
    ) -> QmpResult<Opened> {
        if opts.inject_error.as_ref().is_some_and(|r| r.is_empty()) {
            return Err(QmpError::generic(
                "Block protocol 'blkdebug' doesn't support the option 'inject-error'",
            ));
        }
        // The limits, in schema order; QEMU refuses negative ones before opening anything.
        let limits = [
            ("align", opts.align),
            ("max-transfer", opts.max_transfer.map(i64::from)),
            ("opt-write-zero", opts.opt_write_zero.map(i64::from)),
            ("max-write-zero", opts.max_write_zero.map(i64::from)),
            ("opt-discard", opts.opt_discard.map(i64::from)),
            ("max-discard", opts.max_discard.map(i64::from)),
        ];
        if let Some((name, Some(v))) = limits.iter().find(|(_, v)| v.is_some_and(|v| v < 0)) {
            return Err(QmpError::generic(format!(
                "Value '{v}' is out of range for parameter '{name}'"
            )));
        }
        let [align, max_transfer, opt_write_zero, max_write_zero, opt_discard, max_discard] =
            limits.map(|(_, v)| v.map_or(0, |v| v as u64));
        let node_limits = Limits {
            align,
            max_transfer,
            opt_write_zero,
            max_write_zero,
            opt_discard,
            max_discard,
        };
        let spec = EdgeSpec::new(ChildRole::Filtered, Parent::Node(parent.into()));
        // A protocol driver in QEMU: named before it opens its image.
        self.take_position(parent, opening);
        let (image, host_file) = self
            .format_child(opts.image.as_ref(), "image", spec, own, opening)
            .await?;
        let image_align = u64::from(image.node().facts().request_alignment);
        node_limits.check(image_align).map_err(QmpError::generic)?;
        let rules = opts
            .inject_error
            .iter()
            .flatten()
            .map(inject_rule)
            .collect();
        // QEMU keeps the rules flattened, and names a node with rules by its options. Its
        // dictionary lists keys that share a bucket newest first, and the options of a child
        // given inline pass through one copy more than a top node's: their ties come out the
        // other way round (recorded on qsd: `errno` before `event` inline, after it on top).
        // A top node's rules reach the name newest first, an inline node's in schema order.
        let mut flat: Vec<(String, Value)> = limits
            .iter()
            .filter_map(|(name, v)| v.map(|v| (name.to_string(), json!(v))))
            .collect();
        for (i, rule) in opts.inject_error.iter().flatten().enumerate() {
            let fields = [
                ("event", Some(json!(rule.event))),
                ("state", rule.state.map(|v| json!(v))),
                ("iotype", rule.iotype.as_ref().map(|v| json!(v))),
                ("errno", rule.errno.map(|v| json!(v))),
                ("sector", rule.sector.map(|v| json!(v))),
                ("once", rule.once.map(|v| json!(v))),
                ("immediately", rule.immediately.map(|v| json!(v))),
            ];
            for (key, value) in fields {
                if let Some(value) = value {
                    flat.push((format!("inject-error.{i}.{key}"), value));
                }
            }
        }
        for (i, rule) in opts.set_state.iter().flatten().enumerate() {
            flat.push((format!("set-state.{i}.event"), json!(rule.event)));
            if let Some(s) = rule.state {
                flat.push((format!("set-state.{i}.state"), json!(s)));
            }
            flat.push((format!("set-state.{i}.new_state"), json!(rule.new_state)));
        }
        let states = opts
            .set_state
            .iter()
            .flatten()
            .map(|r| SetState {
                event: DebugEvent::from_name(&r.event),
                state: r.state.and_then(|s| u32::try_from(s).ok()),
                new_state: u32::try_from(r.new_state).unwrap_or(0),
            })
            .collect();
        if top {
            flat.reverse();
        }
        let flat: Map<String, Value> = flat.into_iter().collect();
        Ok(Opened {
            driver: Arc::new(
                BlkdebugDriver::new(image, rules, !own.read_only)
                    .with_states(states)
                    .with_limits(node_limits),
            ),
            read_only: own.read_only,
            recipe: NameRecipe::Blkdebug {
                rules: flat,
                has_rules: opts.inject_error.is_some()
                    || opts.set_state.is_some()
                    || limits.iter().any(|(_, v)| v.is_some()),
            },
            host_file,
            node: None,
            cbw: None,
        })
    }

    /// `throttle`: a filter over `file` whose requests wait for its group's limits.
    async fn open_throttle(
        &mut self,
        opts: &BlockdevOptions,
        own: Inherited,
        parent: &str,
        opening: &mut Opening,
    ) -> QmpResult<Opened> {
        let name = opts.throttle_group.clone().unwrap_or_default();
        let group =
            self.throttle_groups.get(&name).cloned().ok_or_else(|| {
                QmpError::generic(format!("Throttle group '{name}' does not exist"))
            })?;
        let spec = EdgeSpec::new(ChildRole::Filtered, Parent::Node(parent.into()));
        let (file, host_file) = self
            .format_child(opts.file.as_ref(), "file", spec, own, opening)
            .await?;
        let driver = drivers::throttle::ThrottleDriver::new(file, group, !own.read_only);
        Ok(Opened {
            driver: Arc::new(driver),
            read_only: own.read_only,
            recipe: NameRecipe::Throttle { group: name },
            host_file,
            node: None,
            cbw: None,
        })
    }

    /// `copy-before-write`: `file` (the source), `target`, `bitmap`, `on-cbw-error`,
    /// `cbw-timeout`, `min-cluster-size`.
    async fn open_cbw(
        &mut self,
        opts: &BlockdevOptions,
        own: Inherited,
        parent: &str,
        opening: &mut Opening,
    ) -> QmpResult<Opened> {
        let spec = EdgeSpec::new(ChildRole::Filtered, Parent::Node(parent.into()))
            .policy(PermPolicy::CopySource);
        let (file, host_file) = self
            .format_child(opts.file.as_ref(), "file", spec, own, opening)
            .await?;
        let spec = EdgeSpec::new(ChildRole::Data, Parent::Node(parent.into()));
        self.take_position(parent, opening);
        let (target, _) = self
            .format_child(opts.target.as_ref(), "target", spec, own, opening)
            .await?;
        let bitmap = match &opts.bitmap {
            Some(b) => {
                let (node, name) = (b.node.as_str(), b.name.as_str());
                let entry = self
                    .entries
                    .get(node)
                    .ok_or_else(|| QmpError::generic(format!("Node '{node}' not found")))?;
                let bitmap = entry
                    .node
                    .with_bitmap(name, |b| b.clone())
                    .ok_or_else(|| QmpError::generic(format!("Dirty bitmap '{name}' not found")))?;
                if bitmap.busy() {
                    return Err(QmpError::generic(format!(
                        "Cannot create block-copy-state: Failed to merge bitmap '{name}' to internal copy-bitmap: Bitmap '{name}' is currently in use by another operation and cannot be used"
                    )));
                }
                if bitmap.disk_size() != file.node().len() {
                    return Err(QmpError::generic(format!(
                        "Cannot create block-copy-state: Failed to merge bitmap '{name}' to internal copy-bitmap: Bitmaps are of different sizes (destination size is {}, source size is {}) and can't be merged",
                        file.node().len(),
                        bitmap.disk_size()
                    )));
                }
                Some(bitmap)
            }
            None => None,
        };
        let cbw_opts = CbwOptions {
            on_cbw_error: match opts.on_cbw_error.as_deref() {
                Some("break-snapshot") => OnCbwError::BreakSnapshot,
                _ => OnCbwError::BreakGuestWrite,
            },
            timeout: opts.cbw_timeout.filter(|&t| t > 0).map(Duration::from_secs),
            min_cluster_size: opts.min_cluster_size.unwrap_or(0),
            bitmap,
            ..CbwOptions::default()
        };
        let (node, cbw) =
            CopyBeforeWrite::open(parent.to_owned(), file, target, cbw_opts).map_err(generic)?;
        Ok(Opened {
            driver: cbw.clone(),
            read_only: false,
            recipe: cbw_recipe(),
            host_file,
            node: Some(node),
            cbw: Some(cbw),
        })
    }

    /// `snapshot-access` over a copy-before-write node (`file`).
    async fn open_snapshot_access(
        &mut self,
        opts: &BlockdevOptions,
        own: Inherited,
        parent: &str,
        opening: &mut Opening,
    ) -> QmpResult<Opened> {
        let spec = EdgeSpec::new(ChildRole::Data, Parent::Node(parent.into()))
            .named("file")
            .policy(PermPolicy::Free);
        let (file, host_file) = self
            .format_child(opts.file.as_ref(), "file", spec, own, opening)
            .await?;
        let cbw = self
            .entries
            .get(file.node().name())
            .and_then(|e| e.cbw.clone());
        Ok(Opened {
            driver: SnapshotAccess::new(file, cbw),
            read_only: false,
            recipe: NameRecipe::Filter {
                driver: "snapshot-access",
                children: vec![("file", ChildRole::Data)],
            },
            host_file,
            node: None,
            cbw: None,
        })
    }

    /// `blockdev-del`, with QEMU's checks in QEMU's order: a backend uses it, an overlay uses
    /// it as its backing file, the monitor does not own it, another node uses it.
    pub async fn delete(&mut self, name: &str) -> QmpResult<()> {
        let entry = self.entries.get(name).ok_or_else(|| {
            QmpError::generic(format!("Failed to find node with node-name='{name}'"))
        })?;
        let parents = entry.node.parents();
        // A backend uses it (an export, a job's main node): QEMU's "has a BlockBackend" case.
        // Other nodes a job holds (a backup's target) are QEMU's op blockers, checked next.
        let backend = |p: &Arc<Child>| {
            p.role() == ChildRole::Root
                && !(matches!(p.parent(), Parent::Job { .. }) && p.name() != block_jobs::MAIN_NODE)
        };
        if parents.iter().any(backend) {
            return Err(QmpError::generic(format!("Node {name} is in use")));
        }
        refuse_busy(&entry.node)?;
        // The newest overlay's blocker is the one QEMU reports.
        if let Some(overlay) = parents
            .iter()
            .rev()
            .filter(|p| p.role() == ChildRole::Backing)
            .find_map(|p| p.parent_node_name())
        {
            return Err(QmpError::generic(format!(
                "Node '{name}' is busy: node is used as backing hd of '{overlay}'"
            )));
        }
        if !entry.monitor_owned {
            return Err(QmpError::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if !parents.is_empty() {
            return Err(QmpError::generic(format!("Block device {name} is in use")));
        }
        self.close_and_remove(name).await;
        Ok(())
    }

    /// Closes a node that has no parents, then its implicit children that are left without
    /// parents.
    fn close_and_remove<'a>(
        &'a mut self,
        name: &'a str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(async move {
            let Some(entry) = self.entries.remove(name) else {
                return;
            };
            let children: Vec<String> = entry
                .node
                .children()
                .iter()
                .map(|c| c.node().name().to_owned())
                .collect();
            if let Err(e) = entry.node.close().await {
                tracing::error!(target: "blockjobd", "closing node '{name}': {}", error_text(&e));
            }
            drop(entry);
            for child in children {
                let orphan = self
                    .entries
                    .get(&child)
                    .is_some_and(|c| !c.monitor_owned && c.node.parents().is_empty());
                if orphan {
                    self.close_and_remove(&child).await;
                }
            }
        })
    }

    /// Closes every node, parents before children (shutdown).
    pub async fn close_all(&mut self) {
        while !self.entries.is_empty() {
            let roots: Vec<String> = self
                .entries
                .iter()
                .filter(|(_, e)| e.node.parents().is_empty())
                .map(|(n, _)| n.clone())
                .collect();
            if roots.is_empty() {
                // Only possible with a reference cycle, which blockdev-add cannot build.
                tracing::error!(target: "blockjobd", "nodes left with parents at shutdown");
                return;
            }
            for name in roots {
                if let Some(entry) = self.entries.remove(&name) {
                    if let Err(e) = entry.node.close().await {
                        tracing::error!(target: "blockjobd", "closing node '{name}': {}", error_text(&e));
                    }
                }
            }
        }
    }
}

/// What a driver-specific opener produced.
struct Opened {
    driver: Arc<dyn BlockDriver>,
    read_only: bool,
    recipe: NameRecipe,
    host_file: Option<PathBuf>,
    /// The node, when the driver had to make it itself (copy-before-write owns bitmaps).
    node: Option<Arc<BlockNode>>,
    /// The copy-before-write driver, for a snapshot-access node opened on it later.
    cbw: Option<Arc<CopyBeforeWrite>>,
}

/// The `nbd` driver: `server` (unix path or inet host/port), `export`, `reconnect-delay`.
async fn open_nbd(opts: &BlockdevOptions, own: Inherited) -> QmpResult<Opened> {
    let server = opts.server.as_ref();
    let field = |f: fn(&NbdServer) -> &Option<String>| {
        server.and_then(|m| f(m).clone()).unwrap_or_default()
    };
    let export = opts.export.as_deref().unwrap_or_default();
    let (target, filename) = match server.map(|s| s.kind.as_str()) {
        Some("unix") => {
            let path = field(|s| &s.path);
            let uri = match export {
                "" => format!("nbd+unix://?socket={path}"),
                e => format!("nbd+unix:///{e}?socket={path}"),
            };
            (ConnectTo::Unix(PathBuf::from(path)), uri)
        }
        _ => {
            let (host, port) = (field(|s| &s.host), field(|s| &s.port));
            let uri = match export {
                "" => format!("nbd://{host}:{port}"),
                e => format!("nbd://{host}:{port}/{e}"),
            };
            (ConnectTo::Tcp(host, port), uri)
        }
    };
    let delay = Duration::from_secs(opts.reconnect_delay.unwrap_or(0));
    let read_only = own.read_only;
    let driver = match NbdDriver::connect(target.clone(), export, delay, read_only).await {
        Err(e) if own.auto_read_only && e.kind() == block::ErrorKind::ReadOnly => {
            (NbdDriver::connect(target, export, delay, true).await, true)
        }
        other => (other, read_only),
    };
    let (driver, read_only) = driver;
    let mut options = json_map(json!({"driver": "nbd"}));
    if let Some(s) = server {
        options.insert("server.type".into(), json!(s.kind));
        for (key, value) in [("path", &s.path), ("host", &s.host), ("port", &s.port)] {
            if let Some(v) = value {
                options.insert(format!("server.{key}"), json!(v));
            }
        }
    }
    if let Some(e) = &opts.export {
        options.insert("export".into(), json!(e));
    }
    Ok(Opened {
        driver: Arc::new(driver.map_err(generic)?),
        read_only,
        recipe: NameRecipe::Fixed(NodeFileName::protocol(Some(filename), options)),
        host_file: None,
        node: None,
        cbw: None,
    })
}

fn open_null(opts: &BlockdevOptions, own: Inherited) -> Opened {
    let size = opts.size.unwrap_or(DEFAULT_NULL_SIZE);
    let mut driver = NullDriver::new(size).read_only(own.read_only);
    if opts.driver == "null-aio" {
        driver = driver.aio();
    }
    if let Some(ns) = opts.latency_ns {
        driver = driver.latency(Duration::from_nanos(ns));
    }
    // `size` and `read-zeroes` change the disk: QEMU then names the node by its options.
    let name = driver.driver_name();
    let mut options = json_map(json!({"driver": name}));
    if let Some(z) = opts.read_zeroes {
        options.insert("read-zeroes".into(), json!(z));
    }
    if let Some(size) = opts.size {
        options.insert("size".into(), json!(size));
    }
    let exact = (opts.size.is_none() && opts.read_zeroes.is_none()).then(|| format!("{name}://"));
    Opened {
        recipe: NameRecipe::Fixed(NodeFileName::protocol(exact, options)),
        driver: Arc::new(driver),
        read_only: own.read_only,
        host_file: None,
        node: None,
        cbw: None,
    }
}

/// How a copy-before-write node is named: under its source's name, as QEMU's filter is.
pub fn cbw_recipe() -> NameRecipe {
    NameRecipe::Filter {
        driver: "copy-before-write",
        children: vec![("file", ChildRole::Filtered), ("target", ChildRole::Data)],
    }
}

/// The object `v` is (every caller passes an object literal).
fn json_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

fn inject_rule(m: &InjectRule) -> InjectError {
    InjectError {
        event: DebugEvent::from_name(&m.event),
        errno: m
            .errno
            .and_then(|e| i32::try_from(e).ok())
            .unwrap_or(libc::EIO),
        sector: m.sector.and_then(|s| u64::try_from(s).ok()),
        once: m.once.unwrap_or(false),
        state: m.state.and_then(|s| u32::try_from(s).ok()),
        iotypes: match m.iotype.as_deref() {
            Some("read") => IoType::Read.mask(),
            Some("write") => IoType::Write.mask(),
            Some("write-zeroes") => IoType::WriteZeroes.mask(),
            Some("discard") => IoType::Discard.mask(),
            Some("flush") => IoType::Flush.mask(),
            Some("block-status") => IoType::BlockStatus.mask(),
            _ => IoType::DEFAULT,
        },
    }
}

/// The format of a backing file named without one: qcow2 by its magic, else raw.
pub(crate) async fn probe(path: &Path) -> QmpResult<String> {
    let file = FileDriver::open(FileOptions {
        read_only: true,
        ..FileOptions::new(path)
    })
    .map_err(|e| QmpError::generic(format!("Could not open backing file: {}", error_text(&e))))?;
    let node = BlockNode::new("probe", Arc::new(file));
    let child = Child::new(ChildRole::File, node);
    let format = drivers::probe_format(&child).await.map_err(generic)?;
    Ok(format.name().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_qemu() {
        assert!(check_node_name("a-b.c_d9").is_ok());
        assert_eq!(
            check_node_name("1bad").expect_err("digit").desc,
            "Invalid node-name: '1bad'"
        );
        assert!(check_node_name("#block1").is_err());
        assert!(check_node_name("").is_err());
        assert_eq!(
            check_node_name(&"a".repeat(32)).expect_err("long").desc,
            "Node name too long"
        );
        assert!(check_node_name(&"a".repeat(31)).is_ok());
    }

    #[test]
    fn error_text_drops_the_os_error_number() {
        let e = BlockError::io(
            "Could not open 'x'",
            std::io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            error_text(&e),
            "Could not open 'x': No such file or directory"
        );
    }
}
