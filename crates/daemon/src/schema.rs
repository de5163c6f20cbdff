//! What blockjobd implements, as a QMP schema: the one description behind argument checking,
//! start-up option conversion and `query-qmp-schema`. This module holds the protocol's own
//! part (introspection, capabilities, version, events); each command declares its arguments
//! and replies beside its handler (`crate::commands`).
//!
//! Only what we honour is listed. A member QEMU has and we do not (`pr-manager`, `aio=native`,
//! …) is therefore refused with QEMU's own "unexpected" or "does not accept value" message,
//! and a feature prober sees it is absent.

use qmp::Schema;

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

/// The complete schema of blockjobd.
pub fn schema() -> Schema {
    let mut s = Schema::new();
    s.enumeration("QMPCapability", &["oob"])
        .object("QmpCapabilitiesArgs", &["*enable:[QMPCapability]"])
        .object("VersionTriple", &["major:int", "minor:int", "micro:int"])
        .object("VersionInfo", &["qemu:VersionTriple", "package:str"])
        .object("CommandInfo", &["name:str"]);
    introspection_types(&mut s);
    s.command("qmp_capabilities", Some("QmpCapabilitiesArgs"), None, &[])
        .command("query-version", None, Some("VersionInfo"), &[])
        .command("query-commands", None, Some("[CommandInfo]"), &[])
        .command("query-qmp-schema", None, Some("[SchemaInfo]"), &[])
        .command("quit", None, None, &[]);
    // Each command's arguments and replies are declared beside its handler.
    crate::commands::schema(&mut s);
    s.event("JOB_STATUS_CHANGE", Some("JobStatusChangeData"))
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
