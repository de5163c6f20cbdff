//! The `blkdebug` filter: passes I/O to its `image` child and fails the requests its rules
//! match, for rehearsing error handling (jobs' `on-error`, exports' errnos).
//!
//! As in QEMU, a rule names an event ([`DebugEvent`]): `read_aio` and `write_aio`, which a
//! format driver above announces before it reads or writes guest data through this node (raw
//! and qcow2 do; filters pass the announcement down; a job, an export or a filter sending its
//! own I/O does not), qcow2's metadata events, a flushed format's `flush_to_*`, or the
//! `pwritev*` events this node announces to itself for the writes that reach it. The event
//! makes its rules active, replacing the rules an earlier event made active;
//! an active rule then fails every read, write, write-zeroes, discard and flush that reaches
//! this node, whoever sends it, until a later event with rules replaces it, or, with `once`,
//! after it fired. A rule with a `sector` (512-byte unit) only fails requests that contain the
//! start of that sector, and one with an `iotype` only that kind of request. So a blkdebug
//! node with nothing above it injects nothing.
//! `immediately` is accepted: errors are always returned at once.
//!
//! Its limits (`align`, `max-transfer`, `opt-write-zero`, `max-write-zero`, `opt-discard`,
//! `max-discard`; [`Limits`]) shape the requests that reach it, as in QEMU: reads and writes
//! come aligned and split by the block layer; write-zeroes go down in pieces of at most
//! `max-write-zero` bytes cut at `opt-write-zero` boundaries, and a piece shorter than that
//! alignment is written as a buffer of zeroes instead (a write to the rules); discards go down
//! in pieces of at most `max-discard` bytes cut at `opt-discard` boundaries.
//!
//! The node has a state, 1 at first. A rule with a `state` only applies in that state, and
//! `set-state` rules move the node to `new_state` when their event fires (in their `state`,
//! if they name one), after the event's `inject-error` rules were looked at, as in QEMU.

use std::io;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use block::{BlockDriver, BlockError, BlockStatus, Child, Facts, IoVec, Result};
use block::{WriteFlags, ZeroFlags};
use bytes::BytesMut;

pub use block::DebugEvent;

/// One `inject-error` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectError {
    /// The event that triggers the rule.
    pub event: DebugEvent,
    /// The errno the request fails with.
    pub errno: i32,
    /// Only requests holding the start of this 512-byte sector (`None`: every request).
    pub sector: Option<u64>,
    /// Remove the rule after it fired once.
    pub once: bool,
    /// The kinds of request it fails ([`IoType::mask`]s; [`IoType::DEFAULT`] unless given).
    pub iotypes: u8,
    /// Only in this state (`None` or 0: any).
    pub state: Option<u32>,
}

/// One `set-state` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetState {
    /// The event that triggers the rule.
    pub event: DebugEvent,
    /// Only in this state (`None` or 0: any).
    pub state: Option<u32>,
    /// The state the node moves to.
    pub new_state: u32,
}

fn in_state(want: Option<u32>, state: u32) -> bool {
    want.is_none_or(|w| w == 0 || w == state)
}

/// A kind of request, for a rule's `iotype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoType {
    /// Reads.
    Read,
    /// Writes.
    Write,
    /// Write-zeroes.
    WriteZeroes,
    /// Discards.
    Discard,
    /// Flushes.
    Flush,
    /// Block-status queries.
    BlockStatus,
}

impl IoType {
    /// What a rule fails when it names no `iotype`: everything but block-status queries.
    pub const DEFAULT: u8 = 0b01_1111;

    /// The kind's bit.
    pub fn mask(self) -> u8 {
        1 << self as u8
    }
}

#[derive(Debug, Default)]
struct Rules {
    /// Every rule, in the order given.
    all: Vec<InjectError>,
    /// Indices into `all` of the active rules, in the order given: the first match fires.
    active: Vec<usize>,
    /// `set-state` rules.
    states: Vec<SetState>,
    /// The node's state.
    state: u32,
}

/// The request limits a blkdebug node imposes (0: the image's own), checked by whoever opens
/// it with [`Limits::check`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Request alignment.
    pub align: u64,
    /// Largest read or write.
    pub max_transfer: u64,
    /// Write-zeroes alignment; shorter pieces become writes.
    pub opt_write_zero: u64,
    /// Largest write-zeroes.
    pub max_write_zero: u64,
    /// Discard alignment.
    pub opt_discard: u64,
    /// Largest discard.
    pub max_discard: u64,
}

impl Limits {
    /// QEMU's checks, in its order, against the image's request alignment: `Err` holds the
    /// message.
    pub fn check(&self, image_align: u64) -> std::result::Result<(), String> {
        const INT_MAX: u64 = i32::MAX as u64;
        if self.align != 0 && (self.align >= INT_MAX || !self.align.is_power_of_two()) {
            return Err(format!("Cannot meet constraints with align {}", self.align));
        }
        let align = self.align.max(image_align).max(1);
        let fits = |v: u64, to: u64| v == 0 || (v < INT_MAX && v % to.max(1) == 0);
        let checks = [
            ("max-transfer", self.max_transfer, align),
            ("opt-write-zero", self.opt_write_zero, align),
            (
                "max-write-zero",
                self.max_write_zero,
                self.opt_write_zero.max(align),
            ),
            ("opt-discard", self.opt_discard, align),
            ("max-discard", self.max_discard, self.opt_discard.max(align)),
        ];
        for (name, value, to) in checks {
            if !fits(value, to) {
                return Err(format!("Cannot meet constraints with {name} {value}"));
            }
        }
        Ok(())
    }
}

/// `[offset, offset+len)` cut at multiples of `align` and into pieces of at most `max` bytes
/// (0: no limit), as QEMU's block layer cuts write-zeroes and discards: an unaligned head up
/// to the first boundary, aligned pieces, an unaligned tail.
fn pieces(offset: u64, len: u64, align: u64, max: u64) -> Vec<(u64, u64)> {
    let align = align.max(1);
    let max = if max == 0 { u64::MAX } else { max };
    let end = offset + len;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let next_boundary = (at / align + 1) * align;
        let n = if at % align != 0 {
            next_boundary.min(end) - at
        } else {
            let aligned = (end - at) / align * align;
            let capped = (max / align * align).max(align.min(max));
            if aligned == 0 {
                end - at
            } else {
                aligned.min(capped)
            }
        };
        out.push((at, n));
        at += n;
    }
    out
}

/// The blkdebug filter.
#[derive(Debug)]
pub struct BlkdebugDriver {
    image: Arc<Child>,
    rules: Mutex<Rules>,
    writable: bool,
    limits: Limits,
}

impl BlkdebugDriver {
    /// A blkdebug node over `image` with `rules`.
    pub fn new(image: Arc<Child>, rules: Vec<InjectError>, writable: bool) -> Self {
        Self {
            image,
            rules: Mutex::new(Rules {
                all: rules,
                active: Vec::new(),
                states: Vec::new(),
                state: 1,
            }),
            writable,
            limits: Limits::default(),
        }
    }

    /// The same node with request limits (checked with [`Limits::check`]).
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Write-zeroes in the pieces its limits cut; a piece below the write-zeroes alignment is
    /// refused by QEMU's driver and written by its block layer as buffers of zeroes of at most
    /// `max-transfer` bytes, each a write to the rules.
    async fn write_zero_pieces(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let facts = self.facts();
        let align = u64::from(facts.request_alignment).max(self.limits.opt_write_zero);
        for (at, n) in pieces(offset, len, align, self.limits.max_write_zero) {
            if n >= align {
                self.check(IoType::WriteZeroes, at, n)?;
                self.image.write_zeroes(at, n, flags).await?;
                continue;
            }
            for (at, n) in pieces(at, n, 1, u64::from(facts.max_transfer)) {
                self.check(IoType::Write, at, n)?;
                let zeroes = IoVec::from(vec![0u8; n as usize]);
                self.image.write(at, zeroes, WriteFlags::default()).await?;
            }
        }
        Ok(())
    }

    /// The same node with `set-state` rules.
    pub fn with_states(self, states: Vec<SetState>) -> Self {
        {
            let mut rules = self.rules();
            rules.states = states;
        }
        self
    }

    fn rules(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails the request when an active rule matches it (`len` 0: a flush).
    fn check(&self, kind: IoType, offset: u64, len: u64) -> Result<()> {
        let mut rules = self.rules();
        let hit = rules.active.iter().position(|&i| {
            let rule = &rules.all[i];
            rule.iotypes & kind.mask() != 0
                && rule.sector.is_none_or(|s| {
                    let start = s.saturating_mul(512);
                    len > 0 && start >= offset && start - offset < len
                })
        });
        let Some(at) = hit else {
            return Ok(());
        };
        let index = rules.active[at];
        let rule = rules.all[index].clone();
        if rule.once {
            rules.active.remove(at);
            rules.all.remove(index);
            for i in rules.active.iter_mut() {
                if *i > index {
                    *i -= 1;
                }
            }
        }
        Err(BlockError::io(
            format!("blkdebug: injected error at offset {offset}"),
            io::Error::from_raw_os_error(rule.errno),
        ))
    }
}

#[async_trait]
impl BlockDriver for BlkdebugDriver {
    fn driver_name(&self) -> &'static str {
        "blkdebug"
    }
    fn len(&self) -> u64 {
        self.image.node().len()
    }
    fn facts(&self) -> Facts {
        // A filter: writes past the end grow the image when its file does (qcow2 over
        // blkdebug over file allocates at the end of the file).
        let image = self.image.node().facts();
        let l = &self.limits;
        Facts {
            cluster_size: None,
            request_alignment: image.request_alignment.max(l.align as u32),
            max_transfer: if l.max_transfer == 0 {
                image.max_transfer
            } else {
                l.max_transfer as u32
            },
            ..image
        }
    }
    fn children(&self) -> Vec<Arc<Child>> {
        vec![self.image.clone()]
    }
    fn writable(&self) -> bool {
        self.writable
    }
    fn debug_event(&self, event: DebugEvent) {
        let mut rules = self.rules();
        let state = rules.state;
        let fired: Vec<usize> = (0..rules.all.len())
            .filter(|&i| rules.all[i].event == event && in_state(rules.all[i].state, state))
            .collect();
        if !fired.is_empty() {
            rules.active = fired;
        }
        // Transitions look at the state the event found, not at each other's; QEMU keeps
        // its rules newest first and the last one it looks at wins: the first one given.
        let next = rules
            .states
            .iter()
            .find(|s| s.event == event && in_state(s.state, state))
            .map(|s| s.new_state);
        if let Some(next) = next {
            rules.state = next;
        }
    }
    async fn read(&self, offset: u64, buf: BytesMut) -> Result<BytesMut> {
        self.check(IoType::Read, offset, buf.len() as u64)?;
        self.image.read_into(offset, buf).await
    }
    async fn write(&self, offset: u64, data: IoVec, flags: WriteFlags) -> Result<()> {
        // QEMU's block layer announces a write to the node it reaches, before the driver.
        self.debug_event(DebugEvent::Pwritev);
        self.check(IoType::Write, offset, data.len() as u64)?;
        let r = self.image.write(offset, data, flags).await;
        self.debug_event(DebugEvent::PwritevDone);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.debug_event(DebugEvent::PwritevZero);
        let r = self.write_zero_pieces(offset, len, flags).await;
        self.debug_event(DebugEvent::PwritevDone);
        r
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let l = self.limits;
        let align = u64::from(self.facts().request_alignment);
        for (at, n) in pieces(offset, len, l.opt_discard, l.max_discard) {
            // Pieces shorter than the request alignment are dropped, as QEMU's driver does.
            if n < align {
                continue;
            }
            self.check(IoType::Discard, at, n)?;
            self.image.discard(at, n).await?;
        }
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.check(IoType::Flush, 0, 0)?;
        self.image.flush().await
    }
    /// The image's own status, host offsets included (they are offsets in the image's file,
    /// which the map finds through this filter).
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check(IoType::BlockStatus, offset, len)?;
        self.image.block_status(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::MemDriver;
    use block::{BlockNode, ChildRole};

    fn node(rules: Vec<InjectError>) -> Arc<BlockNode> {
        let mem = BlockNode::new("mem", Arc::new(MemDriver::new(vec![0u8; 1 << 16])));
        let image = Child::new(ChildRole::Filtered, mem);
        BlockNode::new("bd", Arc::new(BlkdebugDriver::new(image, rules, true)))
    }

    #[test]
    fn limits_are_checked_in_qemus_order_against_the_image_alignment() {
        let l = |align, max_transfer, opt_write_zero, max_write_zero| Limits {
            align,
            max_transfer,
            opt_write_zero,
            max_write_zero,
            ..Limits::default()
        };
        assert_eq!(l(0, 0, 0, 0).check(1), Ok(()));
        let e = |s: &str| Err(s.to_string());
        assert_eq!(
            l(3, 0, 0, 0).check(1),
            e("Cannot meet constraints with align 3")
        );
        assert_eq!(
            l(0, 1000, 0, 0).check(512),
            e("Cannot meet constraints with max-transfer 1000")
        );
        assert_eq!(
            l(4096, 65536, 512, 0).check(1),
            e("Cannot meet constraints with opt-write-zero 512")
        );
        assert_eq!(
            l(512, 0, 16384, 8192).check(1),
            e("Cannot meet constraints with max-write-zero 8192")
        );
        let big = i32::MAX as u64;
        assert_eq!(
            l(0, big, 0, 0).check(1),
            Err(format!("Cannot meet constraints with max-transfer {big}"))
        );
    }

    #[test]
    fn pieces_cut_a_head_aligned_middles_and_a_tail() {
        assert_eq!(pieces(0, 10, 1, 0), vec![(0, 10)]);
        assert_eq!(
            pieces(65536, 6 * 65536, 131072, 0),
            vec![(65536, 65536), (131072, 262144), (393216, 65536)]
        );
        assert_eq!(
            pieces(0, 4096, 512, 1024),
            vec![(0, 1024), (1024, 1024), (2048, 1024), (3072, 1024)]
        );
        assert_eq!(pieces(100, 50, 64, 0), vec![(100, 28), (128, 22)]);
    }

    #[tokio::test]
    async fn rules_fail_requests_once_their_event_fired() {
        let bd = node(vec![
            InjectError {
                event: DebugEvent::ReadAio,
                errno: libc::ENOSPC,
                sector: Some(8),
                once: true,
                iotypes: IoType::DEFAULT,
                state: None,
            },
            InjectError {
                event: DebugEvent::WriteAio,
                errno: libc::EIO,
                sector: None,
                once: false,
                iotypes: IoType::DEFAULT,
                state: None,
            },
        ]);
        // A format above announces its requests through its edge.
        let above = Child::new(ChildRole::File, bd.clone());
        // Nothing announced yet: every request passes.
        bd.read(4096, 512).await.expect("no event yet");
        bd.write(0, IoVec::from(vec![1u8; 512]), WriteFlags::default())
            .await
            .expect("no event yet");
        above.debug_event(DebugEvent::ReadAio);
        bd.read(0, 512).await.expect("sector 0 is fine");
        bd.read(4608, 512).await.expect("sector 9 is fine");
        let e = bd
            .read(4000, 512)
            .await
            .expect_err("holds sector 8's start");
        assert_eq!(e.errno(), libc::ENOSPC);
        bd.read(4096, 512).await.expect("once: gone");
        above.debug_event(DebugEvent::ReadAio);
        bd.read(4096, 512).await.expect("gone for good");
        above.debug_event(DebugEvent::WriteAio);
        for _ in 0..2 {
            let e = bd
                .write(0, IoVec::from(vec![1u8; 512]), WriteFlags::default())
                .await
                .expect_err("every write");
            assert_eq!(e.errno(), libc::EIO);
        }
        // An active rule fails whatever reaches the node.
        assert!(bd.write_zeroes(0, 512, ZeroFlags::default()).await.is_err());
        assert!(bd.discard(0, 512).await.is_err());
        assert!(bd.read(0, 512).await.is_err());
        assert!(bd.flush().await.is_err());
        bd.block_status(0, 512).await.expect("not by default");
    }

    #[tokio::test]
    async fn an_iotype_limits_a_rule_to_one_kind_of_request() {
        let bd = node(vec![InjectError {
            event: DebugEvent::ReadAio,
            errno: libc::EIO,
            sector: None,
            once: false,
            iotypes: IoType::Read.mask(),
            state: None,
        }]);
        Child::new(ChildRole::File, bd.clone()).debug_event(DebugEvent::ReadAio);
        assert!(bd.read(0, 512).await.is_err());
        bd.write(0, IoVec::from(vec![1u8; 512]), WriteFlags::default())
            .await
            .expect("only reads fail");
        bd.flush().await.expect("only reads fail");
    }

    #[tokio::test]
    async fn states_gate_rules_and_move_on_events() {
        let mem = BlockNode::new("mem", Arc::new(MemDriver::new(vec![0u8; 1 << 16])));
        let image = Child::new(ChildRole::Filtered, mem);
        let rule = InjectError {
            event: DebugEvent::WriteAio,
            errno: libc::EIO,
            sector: None,
            once: false,
            iotypes: IoType::DEFAULT,
            state: Some(2),
        };
        let driver = BlkdebugDriver::new(image, vec![rule], true).with_states(vec![SetState {
            event: DebugEvent::WriteAio,
            state: Some(1),
            new_state: 2,
        }]);
        let bd = BlockNode::new("bd", Arc::new(driver));
        let above = Child::new(ChildRole::File, bd.clone());
        let write = || bd.write(0, IoVec::from(vec![1u8; 512]), WriteFlags::default());
        // State 1: the rule does not apply; the event moves the node to state 2.
        above.debug_event(DebugEvent::WriteAio);
        write().await.expect("state 1");
        // State 2: the next write event activates the rule.
        above.debug_event(DebugEvent::WriteAio);
        assert!(write().await.is_err());
    }
}
