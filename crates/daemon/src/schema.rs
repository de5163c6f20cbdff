//! What blockjobd implements, as a QMP schema: the one description behind argument checking,
//! start-up option conversion and `query-qmp-schema`.
//!
//! Only what we honour is listed. A member QEMU has and we do not (`pr-manager`, `aio=native`,
//! `detect-zeroes=on`, …) is therefore refused with QEMU's own "unexpected" or "does not
//! accept value" message, and a feature prober sees it is absent.

use qmp::Schema;

/// The drivers `blockdev-add` accepts.
pub const DRIVERS: &[&str] = &[
    "blkdebug",
    "copy-before-write",
    "file",
    "nbd",
    "null-co",
    "qcow2",
    "raw",
    "snapshot-access",
];

fn introspection_types(s: &mut Schema) {
    s.enumeration(
        "JSONType",
        &[
            "string", "number", "int", "boolean", "null", "object", "array", "value",
        ],
    )
    .enumeration(
        "SchemaMetaType",
        &[
            "builtin",
            "enum",
            "array",
            "object",
            "alternate",
            "command",
            "event",
        ],
    )
    .object("SchemaInfoBuiltin", &["json-type:JSONType"])
    .object("SchemaInfoEnumMember", &["name:str", "*features:[str]"])
    .object(
        "SchemaInfoEnum",
        &["members:[SchemaInfoEnumMember]", "values:[str]"],
    )
    .object("SchemaInfoArray", &["element-type:str"])
    .object(
        "SchemaInfoObjectMember",
        &["name:str", "type:str", "*default:any", "*features:[str]"],
    )
    .object("SchemaInfoObjectVariant", &["case:str", "type:str"])
    .object(
        "SchemaInfoObject",
        &[
            "members:[SchemaInfoObjectMember]",
            "*tag:str",
            "*variants:[SchemaInfoObjectVariant]",
        ],
    )
    .object("SchemaInfoAlternateMember", &["type:str"])
    .object(
        "SchemaInfoAlternate",
        &["members:[SchemaInfoAlternateMember]"],
    )
    .object(
        "SchemaInfoCommand",
        &["arg-type:str", "ret-type:str", "*allow-oob:bool"],
    )
    .object("SchemaInfoEvent", &["arg-type:str"])
    .union(
        "SchemaInfo",
        &["name:str", "meta-type:SchemaMetaType", "*features:[str]"],
        "meta-type",
        &[
            ("builtin", "SchemaInfoBuiltin"),
            ("enum", "SchemaInfoEnum"),
            ("array", "SchemaInfoArray"),
            ("object", "SchemaInfoObject"),
            ("alternate", "SchemaInfoAlternate"),
            ("command", "SchemaInfoCommand"),
            ("event", "SchemaInfoEvent"),
        ],
    );
}

fn blockdev_types(s: &mut Schema) {
    s.enumeration("BlockdevDriver", DRIVERS)
        .enumeration("BlockdevDiscardOptions", &["ignore", "unmap"])
        .enumeration("BlockdevDetectZeroesOptions", &["off"])
        .enumeration("BlockdevAioOptions", &["threads"])
        .enumeration("OnOffAuto", &["auto", "on", "off"])
        .object("BlockdevCacheOptions", &["*direct:bool", "*no-flush:bool"])
        .union(
            "BlockdevOptions",
            &[
                "driver:BlockdevDriver",
                "*node-name:str",
                "*discard:BlockdevDiscardOptions",
                "*cache:BlockdevCacheOptions",
                "*read-only:bool",
                "*auto-read-only:bool",
                "*detect-zeroes:BlockdevDetectZeroesOptions",
            ],
            "driver",
            &[
                ("blkdebug", "BlockdevOptionsBlkdebug"),
                ("copy-before-write", "BlockdevOptionsCbw"),
                ("snapshot-access", "BlockdevOptionsGenericFormat"),
                ("file", "BlockdevOptionsFile"),
                ("nbd", "BlockdevOptionsNbd"),
                ("null-co", "BlockdevOptionsNull"),
                ("qcow2", "BlockdevOptionsQcow2"),
                ("raw", "BlockdevOptionsRaw"),
            ],
        )
        .object(
            "BlockdevOptionsFile",
            &[
                "filename:str",
                "*locking:OnOffAuto",
                "*aio:BlockdevAioOptions",
            ],
        )
        .object("BlockdevOptionsNull", &["*size:size", "*read-zeroes:bool"])
        .object(
            "BlockdevOptionsNbd",
            &[
                "server:SocketAddress",
                "*export:str",
                "*reconnect-delay:uint32",
            ],
        )
        .object(
            "BlockdevOptionsRaw",
            &["file:BlockdevRef", "*offset:uint64", "*size:uint64"],
        )
        .object(
            "BlockdevOptionsQcow2",
            &["file:BlockdevRef", "*backing:BlockdevRefOrNull"],
        )
        .enumeration("BlkdebugEvent", &["read_aio", "write_aio"])
        .object(
            "BlkdebugInjectErrorOptions",
            &[
                "event:BlkdebugEvent",
                "*errno:int",
                "*sector:int",
                "*once:bool",
                "*immediately:bool",
            ],
        )
        .object(
            "BlockdevOptionsBlkdebug",
            &[
                "image:BlockdevRef",
                "*inject-error:[BlkdebugInjectErrorOptions]",
            ],
        )
        .enumeration("OnCbwError", &["break-guest-write", "break-snapshot"])
        .object("BlockDirtyBitmapRef", &["node:str", "name:str"])
        .object(
            "BlockdevOptionsCbw",
            &[
                "file:BlockdevRef",
                "target:BlockdevRef",
                "*bitmap:BlockDirtyBitmapRef",
                "*on-cbw-error:OnCbwError",
                "*cbw-timeout:int",
                "*min-cluster-size:size",
            ],
        )
        .object("BlockdevOptionsGenericFormat", &["file:BlockdevRef"])
        .alternate("BlockdevRef", &["BlockdevOptions", "str"])
        .alternate("BlockdevRefOrNull", &["BlockdevOptions", "str", "null"])
        .object("BlockdevDelArgs", &["node-name:str"]);
}

fn query_types(s: &mut Schema) {
    s.object(
        "BlockdevCacheInfo",
        &["writeback:bool", "direct:bool", "no-flush:bool"],
    )
    .object(
        "ImageInfo",
        &[
            "filename:str",
            "format:str",
            "*dirty-flag:bool",
            "*actual-size:int",
            "virtual-size:int",
            "*cluster-size:int",
            "*backing-filename:str",
            "*full-backing-filename:str",
            "*backing-filename-format:str",
            "*backing-image:ImageInfo",
            "*format-specific:any",
        ],
    )
    .object(
        "BlockDeviceInfo",
        &[
            "file:str",
            "*node-name:str",
            "ro:bool",
            "drv:str",
            "*backing_file:str",
            "backing_file_depth:int",
            "active:bool",
            "encrypted:bool",
            "detect_zeroes:BlockdevDetectZeroesOptions",
            "bps:int",
            "bps_rd:int",
            "bps_wr:int",
            "iops:int",
            "iops_rd:int",
            "iops_wr:int",
            "image:ImageInfo",
            "cache:BlockdevCacheInfo",
            "write_threshold:int",
            "*dirty-bitmaps:[BlockDirtyInfo]",
        ],
    )
    .object("QueryNamedBlockNodesArgs", &["*flat:bool"])
    .object(
        "BlockInfo",
        &[
            "device:str",
            "*qdev:str",
            "type:str",
            "removable:bool",
            "locked:bool",
            "*inserted:BlockDeviceInfo",
        ],
    );
}

const JOB_TYPES: &[&str] = &[
    "commit",
    "stream",
    "mirror",
    "backup",
    "create",
    "amend",
    "snapshot-load",
    "snapshot-save",
    "snapshot-delete",
];

fn job_types(s: &mut Schema) {
    s.enumeration("JobType", JOB_TYPES)
        .enumeration(
            "JobStatus",
            &[
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null",
            ],
        )
        .object(
            "JobInfo",
            &[
                "id:str",
                "type:JobType",
                "status:JobStatus",
                "current-progress:int",
                "total-progress:int",
                "*error:str",
            ],
        )
        .object("JobIdArgs", &["id:str"])
        .enumeration(
            "MirrorSyncMode",
            &["top", "full", "none", "incremental", "bitmap"],
        )
        .enumeration("BitmapSyncMode", &["on-success", "never", "always"])
        .enumeration(
            "BlockdevOnError",
            &["report", "ignore", "enospc", "stop", "auto"],
        )
        .object(
            "BackupPerf",
            &[
                "*use-copy-range:bool",
                "*max-workers:int",
                "*max-chunk:int",
                "*min-cluster-size:size",
            ],
        )
        .object(
            "BlockdevBackup",
            &[
                "*job-id:str",
                "device:str",
                "target:str",
                "sync:MirrorSyncMode",
                "*speed:int",
                "*bitmap:str",
                "*bitmap-mode:BitmapSyncMode",
                "*compress:bool",
                "*on-source-error:BlockdevOnError",
                "*on-target-error:BlockdevOnError",
                "*auto-finalize:bool",
                "*auto-dismiss:bool",
                "*filter-node-name:str",
                "*discard-source:bool",
                "*x-perf:BackupPerf",
            ],
        )
        .object("BlockJobDeviceArgs", &["device:str"])
        .object("BlockJobSetSpeedArgs", &["device:str", "speed:int"])
        .object("BlockJobCancelArgs", &["device:str", "*force:bool"])
        .enumeration("BlockDeviceIoStatus", &["ok", "failed", "nospace"])
        .enumeration("MirrorCopyMode", &["background", "write-blocking"])
        .object("BlockJobInfoMirror", &["actively-synced:bool"])
        .object("BlockJobChangeOptionsMirror", &["copy-mode:MirrorCopyMode"])
        .union(
            "BlockJobInfo",
            &[
                "type:JobType",
                "device:str",
                "len:int",
                "offset:int",
                "busy:bool",
                "paused:bool",
                "speed:int",
                "io-status:BlockDeviceIoStatus",
                "ready:bool",
                "status:JobStatus",
                "auto-finalize:bool",
                "auto-dismiss:bool",
                "*error:str",
            ],
            "type",
            &[("mirror", "BlockJobInfoMirror")],
        )
        .union(
            "BlockJobChangeOptions",
            &["id:str", "type:JobType"],
            "type",
            &[("mirror", "BlockJobChangeOptionsMirror")],
        )
        .enumeration("PreallocMode", &["off", "metadata", "falloc", "full"])
        .enumeration("BlockdevQcow2Version", &["v2", "v3"])
        .enumeration("Qcow2CompressionType", &["zlib", "zstd"])
        .object(
            "BlockdevCreateOptionsFile",
            &["filename:str", "size:size", "*preallocation:PreallocMode"],
        )
        .object(
            "BlockdevCreateOptionsQcow2",
            &[
                "file:BlockdevRef",
                "size:size",
                "*version:BlockdevQcow2Version",
                "*backing-file:str",
                "*backing-fmt:BlockdevDriver",
                "*cluster-size:size",
                "*preallocation:PreallocMode",
                "*lazy-refcounts:bool",
                "*refcount-bits:int",
                "*compression-type:Qcow2CompressionType",
            ],
        )
        .union(
            "BlockdevCreateOptions",
            &["driver:BlockdevDriver"],
            "driver",
            &[
                ("file", "BlockdevCreateOptionsFile"),
                ("qcow2", "BlockdevCreateOptionsQcow2"),
            ],
        )
        .object(
            "BlockdevCreateArgs",
            &["job-id:str", "options:BlockdevCreateOptions"],
        )
        .object("JobStatusChangeData", &["id:str", "status:JobStatus"])
        .object(
            "BlockJobProgressData",
            &[
                "type:JobType",
                "device:str",
                "len:int",
                "offset:int",
                "speed:int",
            ],
        )
        .object(
            "BlockJobCompletedData",
            &[
                "type:JobType",
                "device:str",
                "len:int",
                "offset:int",
                "speed:int",
                "*error:str",
            ],
        )
        .enumeration("IoOperationType", &["read", "write"])
        .enumeration("BlockErrorAction", &["ignore", "report", "stop"])
        .object(
            "BlockJobErrorData",
            &[
                "device:str",
                "operation:IoOperationType",
                "action:BlockErrorAction",
            ],
        )
        .object("BlockJobPendingData", &["type:JobType", "id:str"]);
}

fn bitmap_types(s: &mut Schema) {
    s.object(
        "BlockDirtyInfo",
        &[
            "*name:str",
            "count:int",
            "granularity:uint32",
            "recording:bool",
            "busy:bool",
            "persistent:bool",
            "*inconsistent:bool",
        ],
    )
    .object("BlockDirtyBitmap", &["node:str", "name:str"])
    .alternate("BlockDirtyBitmapOrStr", &["str", "BlockDirtyBitmap"])
    .object(
        "BlockDirtyBitmapAdd",
        &[
            "node:str",
            "name:str",
            "*granularity:uint32",
            "*persistent:bool",
            "*disabled:bool",
        ],
    )
    .object(
        "BlockDirtyBitmapMerge",
        &["node:str", "target:str", "bitmaps:[BlockDirtyBitmapOrStr]"],
    )
    .object("BlockDirtyBitmapSha256", &["sha256:str"])
    .enumeration(
        "TransactionActionKind",
        &[
            "abort",
            "blockdev-backup",
            "block-dirty-bitmap-add",
            "block-dirty-bitmap-remove",
            "block-dirty-bitmap-clear",
            "block-dirty-bitmap-enable",
            "block-dirty-bitmap-disable",
            "block-dirty-bitmap-merge",
        ],
    )
    .object("Abort", &[])
    .object("AbortWrapper", &["data:Abort"])
    .object("BlockdevBackupWrapper", &["data:BlockdevBackup"])
    .object("BlockDirtyBitmapAddWrapper", &["data:BlockDirtyBitmapAdd"])
    .object("BlockDirtyBitmapWrapper", &["data:BlockDirtyBitmap"])
    .object(
        "BlockDirtyBitmapMergeWrapper",
        &["data:BlockDirtyBitmapMerge"],
    )
    .union(
        "TransactionAction",
        &["type:TransactionActionKind"],
        "type",
        &[
            ("abort", "AbortWrapper"),
            ("blockdev-backup", "BlockdevBackupWrapper"),
            ("block-dirty-bitmap-add", "BlockDirtyBitmapAddWrapper"),
            ("block-dirty-bitmap-remove", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-clear", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-enable", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-disable", "BlockDirtyBitmapWrapper"),
            ("block-dirty-bitmap-merge", "BlockDirtyBitmapMergeWrapper"),
        ],
    )
    .enumeration("ActionCompletionMode", &["individual", "grouped"])
    .object(
        "TransactionProperties",
        &["*completion-mode:ActionCompletionMode"],
    )
    .object(
        "TransactionArgs",
        &[
            "actions:[TransactionAction]",
            "*properties:TransactionProperties",
        ],
    );
}

fn export_types(s: &mut Schema) {
    s.enumeration("SocketAddressType", &["inet", "unix"])
        .object("InetSocketAddress", &["host:str", "port:str"])
        .object("UnixSocketAddress", &["path:str"])
        .object("InetSocketAddressWrapper", &["data:InetSocketAddress"])
        .object("UnixSocketAddressWrapper", &["data:UnixSocketAddress"])
        .union(
            "SocketAddressLegacy",
            &["type:SocketAddressType"],
            "type",
            &[
                ("inet", "InetSocketAddressWrapper"),
                ("unix", "UnixSocketAddressWrapper"),
            ],
        )
        .union(
            "SocketAddress",
            &["type:SocketAddressType"],
            "type",
            &[("inet", "InetSocketAddress"), ("unix", "UnixSocketAddress")],
        )
        .object(
            "NbdServerStartArgs",
            &[
                "addr:SocketAddressLegacy",
                "*max-connections:uint32",
                "*handshake-max-seconds:uint32",
            ],
        )
        .object(
            "NbdServerOptions",
            &[
                "addr:SocketAddress",
                "*max-connections:uint32",
                "*handshake-max-seconds:uint32",
            ],
        )
        .enumeration("BlockExportType", &["nbd"])
        .union(
            "BlockExportOptions",
            &[
                "type:BlockExportType",
                "id:str",
                "node-name:str",
                "*writable:bool",
                "*writethrough:bool",
            ],
            "type",
            &[("nbd", "BlockExportOptionsNbd")],
        )
        .object(
            "BlockExportOptionsNbd",
            &[
                "*name:str",
                "*description:str",
                "*bitmaps:[BlockDirtyBitmapOrStr]",
                "*allocation-depth:bool",
            ],
        )
        .enumeration("BlockExportRemoveMode", &["safe", "hard"])
        .object(
            "BlockExportDelArgs",
            &["id:str", "*mode:BlockExportRemoveMode"],
        )
        .object(
            "BlockExportInfo",
            &[
                "id:str",
                "type:BlockExportType",
                "node-name:str",
                "shutting-down:bool",
            ],
        )
        .object(
            "NbdServerAddOptions",
            &[
                "device:str",
                "*name:str",
                "*description:str",
                "*writable:bool",
                "*bitmap:str",
            ],
        )
        .object(
            "NbdServerRemoveArgs",
            &["name:str", "*mode:BlockExportRemoveMode"],
        )
        .object("BlockExportDeletedData", &["id:str"]);
}

/// The complete schema of blockjobd.
pub fn schema() -> Schema {
    let mut s = Schema::new();
    s.enumeration("QMPCapability", &["oob"])
        .object("QmpCapabilitiesArgs", &["*enable:[QMPCapability]"])
        .object("VersionTriple", &["major:int", "minor:int", "micro:int"])
        .object("VersionInfo", &["qemu:VersionTriple", "package:str"])
        .object("CommandInfo", &["name:str"]);
    introspection_types(&mut s);
    blockdev_types(&mut s);
    query_types(&mut s);
    bitmap_types(&mut s);
    job_types(&mut s);
    export_types(&mut s);
    s.command("qmp_capabilities", Some("QmpCapabilitiesArgs"), None, &[])
        .command("query-version", None, Some("VersionInfo"), &[])
        .command("query-commands", None, Some("[CommandInfo]"), &[])
        .command("query-qmp-schema", None, Some("[SchemaInfo]"), &[])
        .command("quit", None, None, &[])
        .command("blockdev-add", Some("BlockdevOptions"), None, &[])
        .command("blockdev-del", Some("BlockdevDelArgs"), None, &[])
        .command(
            "query-named-block-nodes",
            Some("QueryNamedBlockNodesArgs"),
            Some("[BlockDeviceInfo]"),
            &[],
        )
        .command("query-block", None, Some("[BlockInfo]"), &[])
        .command("nbd-server-start", Some("NbdServerStartArgs"), None, &[])
        .command("nbd-server-stop", None, None, &[])
        .command("block-export-add", Some("BlockExportOptions"), None, &[])
        .command("block-export-del", Some("BlockExportDelArgs"), None, &[])
        .command("query-block-exports", None, Some("[BlockExportInfo]"), &[])
        .command(
            "nbd-server-add",
            Some("NbdServerAddOptions"),
            None,
            &["deprecated"],
        )
        .command(
            "nbd-server-remove",
            Some("NbdServerRemoveArgs"),
            None,
            &["deprecated"],
        )
        .command(
            "block-dirty-bitmap-add",
            Some("BlockDirtyBitmapAdd"),
            None,
            &[],
        )
        .command(
            "block-dirty-bitmap-remove",
            Some("BlockDirtyBitmap"),
            None,
            &[],
        )
        .command(
            "block-dirty-bitmap-clear",
            Some("BlockDirtyBitmap"),
            None,
            &[],
        )
        .command(
            "block-dirty-bitmap-enable",
            Some("BlockDirtyBitmap"),
            None,
            &[],
        )
        .command(
            "block-dirty-bitmap-disable",
            Some("BlockDirtyBitmap"),
            None,
            &[],
        )
        .command(
            "block-dirty-bitmap-merge",
            Some("BlockDirtyBitmapMerge"),
            None,
            &[],
        )
        .command(
            "x-debug-block-dirty-bitmap-sha256",
            Some("BlockDirtyBitmap"),
            Some("BlockDirtyBitmapSha256"),
            &["unstable"],
        )
        .command("transaction", Some("TransactionArgs"), None, &[])
        .command("job-pause", Some("JobIdArgs"), None, &[])
        .command("job-resume", Some("JobIdArgs"), None, &[])
        .command("job-cancel", Some("JobIdArgs"), None, &[])
        .command("job-complete", Some("JobIdArgs"), None, &[])
        .command("job-finalize", Some("JobIdArgs"), None, &[])
        .command("job-dismiss", Some("JobIdArgs"), None, &[])
        .command("query-jobs", None, Some("[JobInfo]"), &[])
        .command(
            "block-job-set-speed",
            Some("BlockJobSetSpeedArgs"),
            None,
            &[],
        )
        .command("block-job-cancel", Some("BlockJobCancelArgs"), None, &[])
        .command("block-job-pause", Some("BlockJobDeviceArgs"), None, &[])
        .command("block-job-resume", Some("BlockJobDeviceArgs"), None, &[])
        .command("block-job-complete", Some("BlockJobDeviceArgs"), None, &[])
        .command("block-job-dismiss", Some("JobIdArgs"), None, &[])
        .command("block-job-finalize", Some("JobIdArgs"), None, &[])
        .command("block-job-change", Some("BlockJobChangeOptions"), None, &[])
        .command("query-block-jobs", None, Some("[BlockJobInfo]"), &[])
        .command("blockdev-create", Some("BlockdevCreateArgs"), None, &[])
        .command("blockdev-backup", Some("BlockdevBackup"), None, &[])
        .event("JOB_STATUS_CHANGE", Some("JobStatusChangeData"))
        .event("BLOCK_JOB_COMPLETED", Some("BlockJobCompletedData"))
        .event("BLOCK_JOB_CANCELLED", Some("BlockJobProgressData"))
        .event("BLOCK_JOB_READY", Some("BlockJobProgressData"))
        .event("BLOCK_JOB_ERROR", Some("BlockJobErrorData"))
        .event("BLOCK_JOB_PENDING", Some("BlockJobPendingData"))
        .event("BLOCK_EXPORT_DELETED", Some("BlockExportDeletedData"));
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_type_is_defined() {
        super::schema().check_complete().expect("complete");
    }
}
