//! The edits of the block graph: drained sections over nodes and what is below them, and
//! re-pointing parents atomically (replace a node, insert and remove a filter). The graph is
//! the nodes and their edges; its one registry of names is the daemon's (`daemon::nodes`).
//!
//! Edits run inside drained sections of the nodes involved; the re-pointing itself is
//! synchronous (no await between the first and the last edge), and requests queued at a drained
//! node re-check their edge when let in (see [`crate::node`]), so no request ever sees half an
//! edit.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Weak};

use crate::drain::{run_passing, DrainGate, Drained};
use crate::error::{BlockError, Result};
use crate::node::{BlockNode, Child, ChildRole, EdgeSpec};
use crate::perm::{self, Parent};

/// `nodes` and everything below them, each once, parents before children.
pub(crate) fn topological(nodes: &[Arc<BlockNode>]) -> Vec<Arc<BlockNode>> {
    fn visit(
        node: &Arc<BlockNode>,
        seen: &mut HashSet<*const BlockNode>,
        out: &mut Vec<Arc<BlockNode>>,
    ) {
        if !seen.insert(Arc::as_ptr(node)) {
            return;
        }
        for child in node.driver_children() {
            visit(&child.node(), seen, out);
        }
        out.push(node.clone());
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for n in nodes {
        visit(n, &mut seen, &mut out);
    }
    out.reverse();
    out
}

/// A drained section over some nodes and everything below them; see [`drained`].
#[must_use = "the section ends when it is dropped"]
#[derive(Debug)]
pub struct Section {
    held: Vec<Drained>,
}

impl Section {
    /// Runs `f` inside the section: its requests pass every gate the section holds, so the
    /// drainer can read and write the nodes it drained.
    pub async fn run<F: Future>(&self, f: F) -> F::Output {
        let gates: Vec<DrainGate> = self.held.iter().map(|d| d.gate().clone()).collect();
        run_passing(&gates, f).await
    }
}

/// Drains `nodes` and everything below them: new requests wait at their gates, and this
/// returns once none is in flight on any of them. Parents drain before their children, so a
/// parent's requests already on their way down finish first instead of waiting forever at a
/// drained child (inserting a filter drains the filter before the node it sits on).
pub async fn drained(nodes: &[Arc<BlockNode>]) -> Section {
    let mut held = Vec::new();
    for node in topological(nodes) {
        held.push(node.drain().await);
    }
    Section { held }
}

/// Re-points every parent of `old` (but `except`) at `new`, atomically, with both (and what
/// is below them) drained. Refused, with nothing changed, when one of those edges is frozen or
/// when the permissions of the new arrangement conflict.
pub async fn replace_node(
    old: &Arc<BlockNode>,
    new: &Arc<BlockNode>,
    except: Option<&Arc<Child>>,
) -> Result<Vec<Arc<Child>>> {
    check_sizes(old, new)?;
    let _section = drained(&[new.clone(), old.clone()]).await;
    tracing::debug!(target: "graph_edit", old = old.name(), new = new.name(), "replace node");
    let edges: Vec<Arc<Child>> = old
        .parents()
        .into_iter()
        .filter(|edge| !except.is_some_and(|e| Arc::ptr_eq(e, edge)))
        .collect();
    repoint_all(old, new, &edges)?;
    Ok(edges)
}

fn check_sizes(old: &BlockNode, new: &BlockNode) -> Result<()> {
    if old.len() != new.len() {
        return Err(BlockError::invalid(format!(
            "cannot replace node '{}' ({} bytes) by '{}' ({} bytes): sizes differ",
            old.name(),
            old.len(),
            new.name(),
            new.len()
        )));
    }
    Ok(())
}

/// Re-points `edges` from `old` to `new` (callers hold a section over both), or none of them.
fn repoint_all(old: &Arc<BlockNode>, new: &Arc<BlockNode>, edges: &[Arc<Child>]) -> Result<()> {
    if let Some(frozen) = edges.iter().find(|e| e.is_frozen()) {
        return Err(BlockError::invalid(format!(
            "Cannot change '{}' link to '{}'",
            frozen.name(),
            old.name()
        )));
    }
    for edge in edges {
        edge.repoint(new);
    }
    if let Err(e) = perm::refresh(&[new.clone(), old.clone()]) {
        tracing::debug!(target: "graph_edit", "undone: {e}");
        for edge in edges {
            edge.repoint(old);
        }
        let _ = perm::refresh(&[old.clone(), new.clone()]);
        return Err(e);
    }
    Ok(())
}

/// A filter inserted with [`insert_filter`], and the edges the insertion moved onto it.
#[derive(Debug)]
pub struct Inserted {
    /// The filter node.
    pub filter: Arc<BlockNode>,
    moved: Vec<Weak<Child>>,
}

/// Inserts a filter above `node`: `make` receives the filter's edge to `node` and builds the
/// filter node; every other parent of `node` is then re-pointed at the filter.
pub async fn insert_filter(
    node: &Arc<BlockNode>,
    make: impl FnOnce(Arc<Child>) -> Result<Arc<BlockNode>>,
) -> Result<Inserted> {
    insert_filter_with(node, None, make).await
}

/// [`insert_filter`] with the filter's edge to `node` described by `spec` (a copy-before-write
/// filter's `file` edge has a policy of its own).
pub async fn insert_filter_with(
    node: &Arc<BlockNode>,
    spec: Option<EdgeSpec>,
    make: impl FnOnce(Arc<Child>) -> Result<Arc<BlockNode>>,
) -> Result<Inserted> {
    let edge = match spec {
        Some(spec) => Child::detached(spec, node.clone()),
        None => Child::new(ChildRole::Filtered, node.clone()),
    };
    let filter = make(edge.clone())?;
    let moved = replace_node(node, &filter, Some(&edge)).await?;
    Ok(Inserted {
        filter,
        moved: moved.iter().map(Arc::downgrade).collect(),
    })
}

/// Removes a filter inserted with [`insert_filter`]: every parent of the filter points at its
/// child again, the edges the insertion moved and those attached to the filter since (an
/// export of the filter node) alike. A job's edges stay with the filter, as in QEMU.
pub async fn remove_filter(inserted: &Inserted) -> Result<Arc<BlockNode>> {
    let filter = &inserted.filter;
    let child = filter
        .child(ChildRole::Filtered)
        .ok_or_else(|| BlockError::invalid(format!("node '{}' is not a filter", filter.name())))?;
    let below = child.node();
    check_sizes(filter, &below)?;
    let _section = drained(&[filter.clone(), below.clone()]).await;
    tracing::debug!(target: "graph_edit", filter = filter.name(), below = below.name(), "remove filter");
    // Every parent of the filter moves down, those attached to it since it went in (an
    // export of the filter node) included; a job's own edges stay with the node they hold,
    // as QEMU's job children do.
    let mut edges: Vec<Arc<Child>> = inserted
        .moved
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|e| Arc::ptr_eq(&e.node(), filter))
        .collect();
    for edge in filter.parents() {
        let job = matches!(edge.parent(), Parent::Job { .. });
        if !job && !edges.iter().any(|e| Arc::ptr_eq(e, &edge)) {
            edges.push(edge);
        }
    }
    repoint_all(filter, &below, &edges)?;
    Ok(below)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BlockBackend;
    use crate::buf::IoVec;
    use crate::driver::WriteFlags;
    use crate::testing::{MemDisk, PassThrough};
    use std::sync::atomic::Ordering;

    /// Writers keep requests in flight through a backend while filters are inserted above
    /// its node and removed, and the node is replaced back and forth: every write lands on
    /// exactly one leaf (none lost, none doubled), and no edit deadlocks with requests queued
    /// below a filter being inserted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn edits_under_load_lose_no_request() {
        let a = MemDisk::new(1 << 20);
        let b = MemDisk::new(1 << 20);
        let na = BlockNode::new("a", a.clone());
        let nb = BlockNode::new("b", b.clone());
        let backend = BlockBackend::new(na.clone());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..8u64 {
            let backend = backend.clone();
            let done = done.clone();
            writers.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !done.load(Ordering::Relaxed) || n < 50 {
                    let at = (w * 4096 + n * 512) % (1 << 20);
                    backend
                        .write(at, IoVec::from(vec![w as u8; 512]), WriteFlags::default())
                        .await
                        .expect("write");
                    n += 1;
                }
                n
            }));
        }
        let edits = async {
            let mut leaf = na.clone();
            for round in 0..60 {
                let inserted = insert_filter(&leaf, |edge| {
                    Ok(BlockNode::new(format!("f{round}"), PassThrough::new(edge)))
                })
                .await
                .expect("insert");
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let other = if Arc::ptr_eq(&leaf, &na) { &nb } else { &na };
                // The filter's edge moves with the node it sits on.
                replace_node(&leaf, other, None).await.expect("replace");
                leaf = other.clone();
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                let below = remove_filter(&inserted).await.expect("remove");
                assert!(Arc::ptr_eq(&below, &leaf));
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), edits)
            .await
            .expect("edits finish: no deadlock");
        done.store(true, Ordering::Relaxed);
        let mut issued = 0;
        for w in writers {
            issued += w.await.expect("writer");
        }
        let landed = a.writes() + b.writes();
        assert_eq!(landed, issued, "every write reached exactly one leaf");
        assert!(a.writes() > 0 && b.writes() > 0);
    }

    /// A filter that already has users of its own takes over the node's other users: its
    /// requests queued below must finish before it is drained, not wait for it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn replacing_a_node_by_its_busy_ancestor_does_not_deadlock() {
        let sink = MemDisk::new(1 << 20);
        let leaf = BlockNode::new("leaf", sink.clone());
        let edge = Child::new(ChildRole::Filtered, leaf.clone());
        let filter = BlockNode::new("f", PassThrough::new(edge.clone()));
        let above = BlockBackend::new(filter.clone());
        let direct = BlockBackend::new(leaf.clone());
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..8u64 {
            let above = above.clone();
            let done = done.clone();
            writers.push(tokio::spawn(async move {
                while !done.load(Ordering::Relaxed) {
                    above
                        .write(w * 512, IoVec::from(vec![1u8; 512]), WriteFlags::default())
                        .await
                        .expect("write");
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        for _ in 0..20 {
            let r = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                replace_node(&leaf, &filter, Some(&edge)),
            )
            .await;
            r.expect("no deadlock").expect("replace");
            assert!(Arc::ptr_eq(&direct.node(), &filter));
            // And back, for the next round.
            direct.root().repoint(&leaf);
        }
        done.store(true, Ordering::Relaxed);
        for w in writers {
            w.await.expect("writer");
        }
    }

    #[tokio::test]
    async fn the_drainer_does_io_inside_its_section() {
        let sink = MemDisk::new(1 << 20);
        let leaf = BlockNode::new("leaf", sink.clone());
        let filter = insert_filter(&leaf, |edge| {
            Ok(BlockNode::new("f", PassThrough::new(edge)))
        })
        .await
        .expect("insert")
        .filter;
        let backend = BlockBackend::new(filter.clone());
        let section = drained(std::slice::from_ref(&filter)).await;
        // Another user waits ...
        let b2 = backend.clone();
        let outside = tokio::spawn(async move {
            b2.write(0, IoVec::from(vec![1u8; 512]), WriteFlags::default())
                .await
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!outside.is_finished());
        // ... the drainer writes through the filter and down to the drained leaf.
        let inside =
            section.run(backend.write(0, IoVec::from(vec![2u8; 512]), WriteFlags::default()));
        tokio::time::timeout(std::time::Duration::from_secs(5), inside)
            .await
            .expect("the drainer is let through")
            .expect("write");
        assert_eq!(sink.writes(), 1);
        drop(section);
        outside.await.expect("join").expect("write");
        assert_eq!(sink.writes(), 2);
    }

    #[tokio::test]
    async fn filter_insert_and_remove_repoints_backends() {
        let disk = BlockNode::new("disk", MemDisk::new(1 << 20));
        let backend = BlockBackend::new(disk.clone());
        let mut counter = None;
        let inserted = insert_filter(&disk, |edge| {
            let drv = PassThrough::new(edge);
            counter = Some(drv.clone());
            Ok(BlockNode::new("filter", drv))
        })
        .await
        .expect("insert");
        backend
            .write(0, IoVec::from(vec![1u8; 4]), WriteFlags::default())
            .await
            .expect("w");
        let counter = counter.expect("built");
        assert_eq!(
            counter.writes(),
            1,
            "the backend now goes through the filter"
        );
        assert_eq!(disk.parents().len(), 1, "only the filter points at disk");
        // A user attached to the filter itself later (an export of the filter node), and a
        // job holding the filter.
        let reader = BlockBackend::new(inserted.filter.clone());
        let job = EdgeSpec::new(
            ChildRole::Root,
            Parent::Job {
                kind: "backup",
                id: "j".into(),
            },
        );
        let job =
            Child::attach(job, inserted.filter.clone(), crate::EdgePerm::FREE).expect("job edge");
        remove_filter(&inserted).await.expect("remove filter");
        assert!(
            Arc::ptr_eq(&reader.node(), &disk),
            "every user moves down, as in QEMU"
        );
        assert!(
            Arc::ptr_eq(&job.node(), &inserted.filter),
            "the job's edge stays with the filter"
        );
        backend
            .write(0, IoVec::from(vec![1u8; 4]), WriteFlags::default())
            .await
            .expect("w");
        assert_eq!(counter.writes(), 1, "bypassed after removal");
        assert!(Arc::ptr_eq(&backend.node(), &disk));
    }
}
