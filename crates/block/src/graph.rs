//! The block graph: named nodes, and the edits that re-point parents atomically.
//!
//! Edits run inside drained sections of the nodes involved; the re-pointing itself is
//! synchronous (no await between the first and the last edge), and requests queued at a drained
//! node re-check their edge when let in (see [`crate::node`]), so no request ever sees half an
//! edit.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::{BlockError, ErrorKind, Result};
use crate::node::{BlockNode, Child, ChildRole};
use crate::perm;

/// Named nodes of a daemon or a tool.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: BTreeMap<String, Arc<BlockNode>>,
}

impl Graph {
    /// An empty graph.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a node under its node-name; names are unique.
    pub fn add(&mut self, node: Arc<BlockNode>) -> Result<()> {
        if self.nodes.contains_key(node.name()) {
            return Err(BlockError::invalid(format!(
                "Duplicate nodes with node-name='{}'",
                node.name()
            )));
        }
        self.nodes.insert(node.name().to_owned(), node);
        Ok(())
    }

    /// The node named `name`.
    pub fn get(&self, name: &str) -> Result<Arc<BlockNode>> {
        self.nodes.get(name).cloned().ok_or_else(|| {
            BlockError::new(ErrorKind::NotFound, format!("Cannot find node '{name}'"))
        })
    }

    /// Unregisters `name`; refused while any parent still points at it.
    pub fn remove(&mut self, name: &str) -> Result<Arc<BlockNode>> {
        let node = self.get(name)?;
        if !node.parents().is_empty() {
            return Err(BlockError::invalid(format!(
                "Node '{name}' is busy: it has parents"
            )));
        }
        self.nodes.remove(name);
        Ok(node)
    }

    /// All registered nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Arc<BlockNode>> {
        self.nodes.values()
    }
}

/// Re-points every parent of `old` (but `except`) at `new`, atomically, with both drained.
/// Refused, with nothing changed, when one of those edges is frozen or when the permissions
/// of the new arrangement conflict.
pub async fn replace_node(
    old: &Arc<BlockNode>,
    new: &Arc<BlockNode>,
    except: Option<&Arc<Child>>,
) -> Result<()> {
    if old.len() != new.len() {
        return Err(BlockError::invalid(format!(
            "cannot replace node '{}' ({} bytes) by '{}' ({} bytes): sizes differ",
            old.name(),
            old.len(),
            new.name(),
            new.len()
        )));
    }
    let _old = old.drain().await;
    let _new = if Arc::ptr_eq(old, new) {
        None
    } else {
        Some(new.drain().await)
    };
    let edges: Vec<Arc<Child>> = old
        .parents()
        .into_iter()
        .filter(|edge| !except.is_some_and(|e| Arc::ptr_eq(e, edge)))
        .collect();
    if let Some(frozen) = edges.iter().find(|e| e.is_frozen()) {
        return Err(BlockError::invalid(format!(
            "Cannot change '{}' link to '{}'",
            frozen.name(),
            old.name()
        )));
    }
    for edge in &edges {
        edge.repoint(new);
    }
    if let Err(e) = perm::refresh(&[new.clone(), old.clone()]) {
        for edge in &edges {
            edge.repoint(old);
        }
        let _ = perm::refresh(&[old.clone(), new.clone()]);
        return Err(e);
    }
    Ok(())
}

/// Inserts a filter above `node`: `make` receives the filter's edge to `node` and builds the
/// filter node; every other parent of `node` is then re-pointed at the filter.
pub async fn insert_filter(
    node: &Arc<BlockNode>,
    make: impl FnOnce(Arc<Child>) -> Result<Arc<BlockNode>>,
) -> Result<Arc<BlockNode>> {
    let edge = Child::new(ChildRole::Filtered, node.clone());
    let filter = make(edge.clone())?;
    replace_node(node, &filter, Some(&edge)).await?;
    Ok(filter)
}

/// Removes a filter inserted with [`insert_filter`]: its parents point at its child again.
pub async fn remove_filter(filter: &Arc<BlockNode>) -> Result<Arc<BlockNode>> {
    let child = filter
        .child(ChildRole::Filtered)
        .ok_or_else(|| BlockError::invalid(format!("node '{}' is not a filter", filter.name())))?;
    let below = child.node();
    replace_node(filter, &below, None).await?;
    Ok(below)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BlockBackend;
    use crate::buf::IoVec;
    use crate::driver::{BlockDriver, BlockStatus, WriteFlags, ZeroFlags};
    use async_trait::async_trait;
    use bytes::BytesMut;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A pass-through filter counting the writes it sees.
    #[derive(Debug)]
    struct Counting {
        child: Arc<Child>,
        writes: AtomicU64,
    }

    #[async_trait]
    impl BlockDriver for Counting {
        fn driver_name(&self) -> &'static str {
            "counting"
        }
        fn len(&self) -> u64 {
            self.child.node().len()
        }
        fn children(&self) -> Vec<Arc<Child>> {
            vec![self.child.clone()]
        }
        fn writable(&self) -> bool {
            true
        }
        async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
            self.child.read_into(offset, buf).await
        }
        async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.child.write(offset, data, flags).await
        }
        async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
            self.child.write_zeroes(offset, len, flags).await
        }
        async fn discard(&self, offset: u64, len: u64) -> Result<()> {
            self.child.discard(offset, len).await
        }
        async fn flush(&self) -> Result<()> {
            self.child.flush().await
        }
        async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
            self.child.block_status(offset, len).await
        }
    }

    #[derive(Debug)]
    struct Zero(u64);

    #[async_trait]
    impl BlockDriver for Zero {
        fn driver_name(&self) -> &'static str {
            "zero"
        }
        fn len(&self) -> u64 {
            self.0
        }
        fn writable(&self) -> bool {
            true
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
            Ok(BlockStatus::zero(len, None))
        }
    }

    #[tokio::test]
    async fn filter_insert_and_remove_repoints_backends() {
        let mut graph = Graph::new();
        let disk = BlockNode::new("disk", Arc::new(Zero(1 << 20)));
        graph.add(disk.clone()).expect("add");
        assert!(
            graph
                .add(BlockNode::new("disk", Arc::new(Zero(1))))
                .is_err(),
            "duplicate"
        );
        let backend = BlockBackend::new(disk.clone());
        let mut counter = None;
        let filter = insert_filter(&disk, |edge| {
            let drv = Arc::new(Counting {
                child: edge,
                writes: AtomicU64::new(0),
            });
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
            counter.writes.load(Ordering::Relaxed),
            1,
            "the backend now goes through the filter"
        );
        assert!(
            graph.remove("disk").is_err(),
            "disk has a parent (the filter)"
        );
        remove_filter(&filter).await.expect("remove filter");
        backend
            .write(0, IoVec::from(vec![1u8; 4]), WriteFlags::default())
            .await
            .expect("w");
        assert_eq!(
            counter.writes.load(Ordering::Relaxed),
            1,
            "bypassed after removal"
        );
        assert!(Arc::ptr_eq(&backend.node(), &disk));
    }
}
