//! Permissions on edges: QEMU's model in the small.
//!
//! Every edge into a node states what its parent needs of the node ([`Perm`]: consistent
//! read, write, write-unchanged, resize) and what it lets the node's other parents do (the
//! shared set). Two parents conflict when one needs what the other does not share. What a
//! format or filter node needs of its children follows from what its own parents need of it,
//! by the [`PermPolicy`] of the child edge (a raw node nobody writes takes no write on its
//! file; a writable qcow2 node always does, for its metadata).
//!
//! Every graph change (an edge attached, re-pointed, dropped, or its needs changed) is
//! followed by [`refresh`] from the nodes whose parents changed: it walks them and everything
//! below in topological order, checks each node's parents against each other and the node's
//! writability, asks each driver to take what it needs (the file driver's image locks), and
//! then commits — or, on the first refusal, undoes every driver's preparation and leaves all
//! edges as they were.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::fmt;
use std::ops::{BitAnd, BitAndAssign, BitOr, BitOrAssign, Not};
use std::sync::{Arc, Mutex};

use crate::error::{BlockError, Result};
use crate::node::{BlockNode, Child};

/// A set of permissions on a node.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Perm(u8);

impl Perm {
    /// Nothing.
    pub const NONE: Perm = Perm(0);
    /// Reads return what was last written (a backing file under a running commit does not).
    pub const CONSISTENT_READ: Perm = Perm(1);
    /// Writes that change what is read.
    pub const WRITE: Perm = Perm(2);
    /// Writes that do not change what is read (copy-on-read, a mirror's copies).
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// Changing the length.
    pub const RESIZE: Perm = Perm(8);
    /// Every permission.
    pub const ALL: Perm = Perm(15);

    /// The permissions, in QEMU's order, with QEMU's names.
    const NAMES: [(Perm, &'static str); 4] = [
        (Perm::CONSISTENT_READ, "consistent read"),
        (Perm::WRITE, "write"),
        (Perm::WRITE_UNCHANGED, "write unchanged"),
        (Perm::RESIZE, "resize"),
    ];

    /// True when every permission of `other` is in `self`.
    pub fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    /// True when the sets share a permission.
    pub fn intersects(self, other: Perm) -> bool {
        self.0 & other.0 != 0
    }

    /// True for the empty set.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Each permission of the set alone, in QEMU's order, with its bit index.
    pub fn each(self) -> impl Iterator<Item = (u8, Perm)> {
        (0u8..4)
            .map(|i| (i, Perm(1 << i)))
            .filter(move |(_, p)| self.contains(*p))
    }

    /// QEMU's text for the set: `write, resize`.
    pub fn names(self) -> String {
        Perm::NAMES
            .iter()
            .filter(|(p, _)| self.contains(*p))
            .map(|(_, n)| *n)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Debug for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Perm({})", self.names())
    }
}

impl BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        Perm(self.0 | rhs.0)
    }
}

impl BitOrAssign for Perm {
    fn bitor_assign(&mut self, rhs: Perm) {
        self.0 |= rhs.0;
    }
}

impl BitAnd for Perm {
    type Output = Perm;
    fn bitand(self, rhs: Perm) -> Perm {
        Perm(self.0 & rhs.0)
    }
}

impl BitAndAssign for Perm {
    fn bitand_assign(&mut self, rhs: Perm) {
        self.0 &= rhs.0;
    }
}

impl Not for Perm {
    type Output = Perm;
    fn not(self) -> Perm {
        Perm(!self.0 & Perm::ALL.0)
    }
}

/// What an edge needs of its node and what it lets others do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EdgePerm {
    /// Needed.
    pub perm: Perm,
    /// Allowed to the node's other parents.
    pub shared: Perm,
}

impl EdgePerm {
    /// Needs nothing, shares everything: an edge that does not constrain anyone.
    pub const FREE: EdgePerm = EdgePerm {
        perm: Perm::NONE,
        shared: Perm::ALL,
    };

    /// `perm` needed, `shared` shared.
    pub fn new(perm: Perm, shared: Perm) -> Self {
        Self { perm, shared }
    }
}

/// How a parent node derives what it needs of a child from what its own parents need of it
/// (QEMU's child roles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PermPolicy {
    /// Set by its holder, not derived (a backend's root edge: exports, jobs).
    Fixed,
    /// A filter's one child: the parents' needs pass through unchanged.
    Filtered,
    /// A format's image file, holding metadata and data (qcow2's `file`): a writable format
    /// always writes and may grow it, reads it consistently, and shares neither write nor
    /// resize.
    Image,
    /// Data without metadata (raw's `file` with `offset` or `size`): the parents' needs,
    /// and nobody else may resize it.
    Data,
    /// A backing file: read consistently when the parent is; shared for writing only when
    /// the parent's own users share writing.
    Cow,
    /// The source under a copy-before-write filter: what its parents need passes through,
    /// and once the filter has a parent it also reads the source consistently and lets
    /// nobody else write or resize it (a writer beside the filter would bypass it).
    CopySource,
    /// [`CopySource`](Self::CopySource) of a copy that discards what it copied from its
    /// source (backup `discard-source`): it also writes the source.
    CopySourceDiscard,
    /// The target a node copies into (copy-before-write's `target`): written whatever the
    /// parent's own users do; everyone else may do anything but resize it.
    CopyTarget,
    /// Needs nothing and shares everything, whatever the parent's users do
    /// (snapshot-access reads its copy-before-write node through that node's own logic).
    Free,
}

impl PermPolicy {
    /// What a parent with cumulative needs `of_parent` needs of a child over this edge.
    /// `parent_writable`: the parent node was opened read-write; `has_parents`: something
    /// uses the parent node (its cumulative needs come from at least one edge).
    pub fn child_perm(
        self,
        parent_writable: bool,
        has_parents: bool,
        of_parent: EdgePerm,
    ) -> EdgePerm {
        let EdgePerm { perm, shared } = of_parent;
        match self {
            PermPolicy::CopySource if has_parents => EdgePerm::new(
                perm | Perm::CONSISTENT_READ,
                shared & !(Perm::WRITE | Perm::RESIZE),
            ),
            PermPolicy::CopySourceDiscard if has_parents => EdgePerm::new(
                perm | Perm::CONSISTENT_READ | Perm::WRITE,
                shared & !(Perm::WRITE | Perm::RESIZE),
            ),
            PermPolicy::CopySource | PermPolicy::CopySourceDiscard => of_parent,
            PermPolicy::CopyTarget => EdgePerm::new(Perm::WRITE, Perm::ALL & !Perm::RESIZE),
            PermPolicy::Free => EdgePerm::FREE,
            PermPolicy::Fixed | PermPolicy::Filtered => of_parent,
            PermPolicy::Image => {
                let mut perm = perm | Perm::CONSISTENT_READ;
                if parent_writable {
                    perm |= Perm::WRITE | Perm::RESIZE;
                }
                if perm.contains(Perm::WRITE_UNCHANGED) {
                    perm |= Perm::WRITE;
                }
                if perm.contains(Perm::WRITE) {
                    perm |= Perm::RESIZE;
                }
                EdgePerm::new(perm, shared & !(Perm::WRITE | Perm::RESIZE))
            }
            PermPolicy::Data => EdgePerm::new(perm, shared & !Perm::RESIZE),
            PermPolicy::Cow => {
                let mut out = if shared.contains(Perm::WRITE) {
                    Perm::WRITE | Perm::RESIZE
                } else {
                    Perm::NONE
                };
                out |= Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED;
                EdgePerm::new(perm & Perm::CONSISTENT_READ, out)
            }
        }
    }
}

/// Who holds an edge, for messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parent {
    /// A node of the graph, by node-name.
    Node(String),
    /// A user outside the graph, described as QEMU describes it (`an unnamed block device`).
    User(String),
    /// A block job: `kind` is its type (`backup`), `id` its id. The nodes it holds are busy
    /// for other jobs and for deletion (QEMU's op blockers).
    Job {
        /// Job type.
        kind: &'static str,
        /// Job id.
        id: String,
    },
}

impl Parent {
    /// A user outside the graph with no name of its own (an export, a create job), as QEMU
    /// describes such a block backend.
    pub fn unnamed() -> Parent {
        Parent::User("an unnamed block device".into())
    }
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Parent::Node(name) => write!(f, "node '{name}'"),
            Parent::User(desc) => f.write_str(desc),
            Parent::Job { kind, id } => write!(f, "{kind} job '{id}'"),
        }
    }
}

/// Serialises refreshes: each one sees and leaves a consistent set of edge permissions.
static REFRESH: Mutex<()> = Mutex::new(());

thread_local! {
    /// Set while this thread runs a refresh; edges dropped meanwhile defer theirs.
    static IN_REFRESH: Cell<bool> = const { Cell::new(false) };
    /// Nodes that lost a parent during this thread's refresh.
    static DEFERRED: RefCell<Vec<Arc<BlockNode>>> = const { RefCell::new(Vec::new()) };
}

/// Recomputes and applies permissions from `nodes` down; see the module docs. On error nothing
/// changed. `changed` gives new needs for edges being attached or changed, applied only if the
/// whole refresh succeeds.
pub fn refresh_with(nodes: &[Arc<BlockNode>], changed: &[(&Arc<Child>, EdgePerm)]) -> Result<()> {
    let result = {
        let _serial = REFRESH.lock().unwrap_or_else(|p| p.into_inner());
        IN_REFRESH.with(|f| f.set(true));
        let r = refresh_locked(nodes, changed);
        IN_REFRESH.with(|f| f.set(false));
        r
    };
    let deferred: Vec<Arc<BlockNode>> = DEFERRED.with(|d| std::mem::take(&mut *d.borrow_mut()));
    if !deferred.is_empty() {
        release(&deferred);
    }
    result
}

/// [`refresh_with`] with no edge changed by the caller.
pub fn refresh(nodes: &[Arc<BlockNode>]) -> Result<()> {
    refresh_with(nodes, &[])
}

/// Refreshes after `nodes` lost parents: only loosens, so it cannot fail for a reason of the
/// graph's; a driver's failure to release is ignored (the edges are gone either way).
pub(crate) fn release(nodes: &[Arc<BlockNode>]) {
    if IN_REFRESH.with(Cell::get) {
        DEFERRED.with(|d| d.borrow_mut().extend(nodes.iter().cloned()));
        return;
    }
    let _ = refresh(nodes);
}

fn refresh_locked(nodes: &[Arc<BlockNode>], changed: &[(&Arc<Child>, EdgePerm)]) -> Result<()> {
    let order = crate::graph::topological(nodes);
    let mut proposed: HashMap<*const Child, EdgePerm> = changed
        .iter()
        .map(|(edge, p)| (Arc::as_ptr(edge), *p))
        .collect();
    let mut prepared: Vec<&Arc<BlockNode>> = Vec::new();
    let mut cumulative: Vec<EdgePerm> = Vec::with_capacity(order.len());
    let mut outcome = Ok(());
    for node in &order {
        // Newest parent first, as QEMU lists them: the messages name the same pair.
        let parents: Vec<(Arc<Child>, EdgePerm)> = node
            .parents()
            .into_iter()
            .rev()
            .map(|c| {
                let p = proposed
                    .get(&Arc::as_ptr(&c))
                    .copied()
                    .unwrap_or_else(|| c.perm());
                (c, p)
            })
            .collect();
        if let Err(e) = check_parents(node, &parents) {
            outcome = Err(e);
            break;
        }
        let cum = parents.iter().fold(EdgePerm::FREE, |acc, (_, p)| {
            EdgePerm::new(acc.perm | p.perm, acc.shared & p.shared)
        });
        if cum.perm.intersects(Perm::WRITE | Perm::WRITE_UNCHANGED) && !node.writable() {
            outcome = Err(BlockError::read_only("Block node is read-only"));
            break;
        }
        if let Err(e) = node.prepare_perm(cum) {
            outcome = Err(e);
            break;
        }
        prepared.push(node);
        cumulative.push(cum);
        for child in node.driver_children() {
            let p = child
                .policy()
                .child_perm(node.writable(), !parents.is_empty(), cum);
            proposed.insert(Arc::as_ptr(&child), p);
        }
    }
    if let Err(e) = outcome {
        tracing::debug!(target: "perm", "refused: {e}");
        for node in prepared {
            node.abort_perm();
        }
        return Err(e);
    }
    for (node, cum) in order.iter().zip(cumulative) {
        for child in node.parents() {
            if let Some(p) = proposed.get(&Arc::as_ptr(&child)) {
                child.set_perm(*p);
            }
        }
        node.commit_perm(cum);
    }
    // Edges whose parent is outside the walk (a backend, a node being opened) changed too.
    for (edge, p) in changed {
        edge.set_perm(*p);
    }
    Ok(())
}

/// QEMU's pairwise check: no parent may need what another does not share.
fn check_parents(node: &BlockNode, parents: &[(Arc<Child>, EdgePerm)]) -> Result<()> {
    for (a, ap) in parents {
        for (b, bp) in parents {
            if Arc::ptr_eq(a, b) {
                continue;
            }
            let denied = bp.perm & !ap.shared;
            if !denied.is_empty() {
                let name = node.name();
                return Err(BlockError::invalid(format!(
                    "Permission conflict on node '{name}': permissions '{}' are both required by {} (uses node '{name}' as '{}' child) and unshared by {} (uses node '{name}' as '{}' child).",
                    denied.names(),
                    b.parent(),
                    b.name(),
                    a.parent(),
                    a.name(),
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BlockBackend;
    use crate::buf::IoVec;
    use crate::driver::{BlockDriver, BlockStatus, WriteFlags, ZeroFlags};
    use crate::node::{ChildRole, EdgeSpec};
    use crate::testing::PassThrough;
    use async_trait::async_trait;
    use bytes::BytesMut;

    /// A leaf that records what its parents need, and refuses needs in `refuse`.
    #[derive(Debug, Default)]
    struct Leaf {
        writable: bool,
        refuse: Perm,
        committed: Mutex<Option<EdgePerm>>,
        aborts: Mutex<u32>,
    }

    #[async_trait]
    impl BlockDriver for Leaf {
        fn driver_name(&self) -> &'static str {
            "leaf"
        }
        fn len(&self) -> u64 {
            1 << 20
        }
        fn writable(&self) -> bool {
            self.writable
        }
        fn prepare_perm(&self, p: EdgePerm) -> Result<()> {
            if p.perm.intersects(self.refuse) {
                return Err(BlockError::invalid("Failed to get \"write\" lock"));
            }
            Ok(())
        }
        fn commit_perm(&self, p: EdgePerm) {
            *self.committed.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
        }
        fn abort_perm(&self) {
            *self.aborts.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        }
        async fn read(&self, _: u64, buf: BytesMut) -> Result<BytesMut> {
            Ok(buf)
        }
        async fn write(&self, _: u64, _: IoVec, _: WriteFlags) -> Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: ZeroFlags) -> Result<()> {
            Ok(())
        }
        async fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        async fn block_status(&self, _: u64, len: u64) -> Result<BlockStatus> {
            Ok(BlockStatus::data(len, None))
        }
    }

    fn leaf(name: &str, writable: bool, refuse: Perm) -> (Arc<BlockNode>, Arc<Leaf>) {
        let drv = Arc::new(Leaf {
            writable,
            refuse,
            ..Leaf::default()
        });
        (BlockNode::new(name, drv.clone()), drv)
    }

    /// A node `name` (writable or not) over `below` by `policy`, attached as the daemon
    /// attaches a node being opened.
    fn over(
        name: &str,
        below: &Arc<BlockNode>,
        policy: PermPolicy,
        writable: bool,
    ) -> Result<Arc<BlockNode>> {
        let spec = EdgeSpec::new(ChildRole::File, Parent::Node(name.into())).policy(policy);
        let need = policy.child_perm(writable, false, EdgePerm::FREE);
        let child = Child::attach(spec, below.clone(), need)?;
        Ok(BlockNode::new(
            name,
            PassThrough::with_writable(child, writable),
        ))
    }

    fn committed(l: &Leaf) -> Option<EdgePerm> {
        *l.committed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (first parent, second parent, expected refusal of the second), the parents given as
    /// (policy, writable); both over one writable leaf.
    #[test]
    fn second_parents_are_refused_as_qemu_refuses_them() {
        use PermPolicy::*;
        type Parent = (PermPolicy, bool);
        let table: &[(Parent, Parent, Option<&str>)] = &[
            ((Image, true), (Image, true), Some("Permission conflict on node 'f': permissions 'write, resize' are both required by node 'a' (uses node 'f' as 'file' child) and unshared by node 'b' (uses node 'f' as 'file' child).")),
            ((Image, true), (Image, false), Some("Permission conflict on node 'f': permissions 'write, resize' are both required by node 'a' (uses node 'f' as 'file' child) and unshared by node 'b' (uses node 'f' as 'file' child).")),
            ((Image, false), (Image, true), Some("Permission conflict on node 'f': permissions 'write, resize' are both required by node 'b' (uses node 'f' as 'file' child) and unshared by node 'a' (uses node 'f' as 'file' child).")),
            ((Image, false), (Image, false), None),
            ((Image, true), (Filtered, true), None),
            ((Image, true), (Data, true), Some("Permission conflict on node 'f': permissions 'resize' are both required by node 'a' (uses node 'f' as 'file' child) and unshared by node 'b' (uses node 'f' as 'file' child).")),
            ((Cow, false), (Cow, false), None),
            ((Cow, false), (Image, true), None),
        ];
        for (i, (a, b, want)) in table.iter().enumerate() {
            let (f, drv) = leaf("f", true, Perm::NONE);
            let _a = over("a", &f, a.0, a.1).expect("first parent");
            let before = committed(&drv);
            let got = over("b", &f, b.0, b.1).err().map(|e| e.to_string());
            assert_eq!(got.as_deref(), *want, "row {i}");
            if want.is_some() {
                assert_eq!(
                    committed(&drv),
                    before,
                    "row {i}: a refusal changes nothing"
                );
                assert_eq!(f.parents().len(), 1, "row {i}: the refused edge is gone");
            }
        }
    }

    #[test]
    fn needs_pass_through_filters_and_are_released_with_the_edge() {
        let (f, drv) = leaf("f", true, Perm::NONE);
        let raw = over("r", &f, PermPolicy::Filtered, true).expect("raw");
        assert_eq!(committed(&drv), Some(EdgePerm::FREE), "nobody uses raw yet");
        let need = EdgePerm::new(Perm::CONSISTENT_READ | Perm::WRITE, !Perm::RESIZE);
        let backend = BlockBackend::attach(raw.clone(), Parent::unnamed(), need).expect("export");
        assert_eq!(
            committed(&drv),
            Some(need),
            "the export's needs reach the file"
        );
        drop(backend);
        assert_eq!(
            committed(&drv),
            Some(EdgePerm::FREE),
            "released with the export"
        );
        // A read-only file refuses a writer above a raw node, not the raw node itself.
        let (ro, _) = leaf("ro", false, Perm::NONE);
        let raw = over("r2", &ro, PermPolicy::Filtered, true).expect("raw over read-only");
        let err = BlockBackend::attach(raw, Parent::User("x".into()), need).expect_err("writer");
        assert_eq!(err.to_string(), "Block node is read-only");
        assert!(over("q", &ro, PermPolicy::Image, true).is_err());
    }

    #[test]
    fn a_driver_refusal_aborts_every_prepared_node() {
        let (f, drv) = leaf("f", true, Perm::WRITE);
        let raw = over("r", &f, PermPolicy::Filtered, true).expect("raw");
        let read = EdgePerm::new(Perm::CONSISTENT_READ, Perm::ALL);
        let b = BlockBackend::attach(raw.clone(), Parent::User("x".into()), read).expect("reader");
        let write = EdgePerm::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL);
        let err = b.set_need(write).expect_err("locked");
        assert_eq!(err.to_string(), "Failed to get \"write\" lock");
        assert_eq!(*drv.aborts.lock().unwrap_or_else(|p| p.into_inner()), 0);
        assert_eq!(b.root().perm(), read, "the edge keeps its old needs");
        assert_eq!(committed(&drv), Some(read));
    }

    #[tokio::test]
    async fn frozen_edges_and_conflicts_stop_a_replace() {
        let (a, _) = leaf("a", true, Perm::NONE);
        let (b, _) = leaf("b", false, Perm::NONE);
        let need = EdgePerm::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL);
        let backend =
            BlockBackend::attach(a.clone(), Parent::User("x".into()), need).expect("writer");
        // b is read-only: the writer cannot move there, and stays on a.
        let err = crate::graph::replace_node(&a, &b, None)
            .await
            .expect_err("read-only target");
        assert_eq!(err.to_string(), "Block node is read-only");
        assert!(Arc::ptr_eq(&backend.node(), &a));
        let (c, _) = leaf("c", true, Perm::NONE);
        backend.root().freeze();
        let err = crate::graph::replace_node(&a, &c, None)
            .await
            .expect_err("frozen");
        assert_eq!(err.to_string(), "Cannot change 'root' link to 'a'");
        backend.root().unfreeze();
        crate::graph::replace_node(&a, &c, None)
            .await
            .expect("replace");
        assert!(Arc::ptr_eq(&backend.node(), &c));
    }

    #[test]
    fn names_follow_qemu_order() {
        assert_eq!((Perm::RESIZE | Perm::WRITE).names(), "write, resize");
        assert_eq!(
            Perm::ALL.names(),
            "consistent read, write, write unchanged, resize"
        );
        assert_eq!(
            !Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED | Perm::RESIZE
        );
    }

    #[test]
    fn policies_derive_child_needs_as_qemu_does() {
        let free = EdgePerm::FREE;
        // A writable qcow2 nobody uses still writes and resizes its file and shares neither.
        let img = PermPolicy::Image.child_perm(true, true, free);
        assert_eq!(img.perm, Perm::CONSISTENT_READ | Perm::WRITE | Perm::RESIZE);
        assert_eq!(img.shared, Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED);
        // Read-only: reads consistently, still shares no write.
        let ro = PermPolicy::Image.child_perm(false, true, free);
        assert_eq!(ro.perm, Perm::CONSISTENT_READ);
        assert_eq!(ro.shared, img.shared);
        // A raw filter nobody uses takes nothing.
        assert_eq!(PermPolicy::Filtered.child_perm(true, true, free), free);
        // raw with an offset: nobody else may resize.
        let data = PermPolicy::Data.child_perm(true, true, free);
        assert_eq!(data, EdgePerm::new(Perm::NONE, !Perm::RESIZE));
        // Backing: consistent read at most; write shared only if the parent's users share it.
        let writer = EdgePerm::new(Perm::CONSISTENT_READ | Perm::WRITE, Perm::ALL);
        let cow = PermPolicy::Cow.child_perm(true, true, writer);
        assert_eq!(cow.perm, Perm::CONSISTENT_READ);
        assert_eq!(cow.shared, Perm::ALL);
        let strict = EdgePerm::new(Perm::CONSISTENT_READ, Perm::CONSISTENT_READ);
        assert_eq!(
            PermPolicy::Cow.child_perm(true, true, strict).shared,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED
        );
    }
}
