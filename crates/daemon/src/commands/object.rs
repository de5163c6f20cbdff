//! `object-add`, `object-del`, `qom-get`, `qom-set`: QEMU's user-creatable objects, of which
//! blockjobd has `throttle-group` (the limits `throttle` nodes share).

use std::sync::Arc;

use drivers::throttle::{Kind, Limit, Limits, ThrottleGroup};
use qmp::{QmpError, QmpResult, Schema};
use serde_json::{json, Map, Value};

use crate::control::Control;

/// The object types `object-add` creates.
pub const TYPES: &[&str] = &["throttle-group"];

/// The members of QEMU's ThrottleLimits.
const LIMITS: &[&str] = &[
    "*iops-total:int",
    "*iops-total-max:int",
    "*iops-total-max-length:int",
    "*iops-read:int",
    "*iops-read-max:int",
    "*iops-read-max-length:int",
    "*iops-write:int",
    "*iops-write-max:int",
    "*iops-write-max-length:int",
    "*bps-total:int",
    "*bps-total-max:int",
    "*bps-total-max-length:int",
    "*bps-read:int",
    "*bps-read-max:int",
    "*bps-read-max-length:int",
    "*bps-write:int",
    "*bps-write-max:int",
    "*bps-write-max-length:int",
    "*iops-size:int",
];

/// ThrottleGroupProperties: `limits`, and the same limits one by one under `x-` names.
const LEGACY: &[&str] = &[
    "*limits:ThrottleLimits",
    "*x-iops-total:int",
    "*x-iops-total-max:int",
    "*x-iops-total-max-length:int",
    "*x-iops-read:int",
    "*x-iops-read-max:int",
    "*x-iops-read-max-length:int",
    "*x-iops-write:int",
    "*x-iops-write-max:int",
    "*x-iops-write-max-length:int",
    "*x-bps-total:int",
    "*x-bps-total-max:int",
    "*x-bps-total-max-length:int",
    "*x-bps-read:int",
    "*x-bps-read-max:int",
    "*x-bps-read-max-length:int",
    "*x-bps-write:int",
    "*x-bps-write-max:int",
    "*x-bps-write-max-length:int",
    "*x-iops-size:int",
];

pub(crate) fn schema(s: &mut Schema) {
    s.enumeration("ObjectType", TYPES)
        .object("ThrottleLimits", LIMITS)
        .union(
            "ObjectOptions",
            &["qom-type:ObjectType", "id:str"],
            "qom-type",
            &[("throttle-group", "ThrottleGroupProperties")],
        )
        .object("ThrottleGroupProperties", LEGACY)
        .command("object-add", Some("ObjectOptions"), None, &[])
        .command("object-del", Some("ObjectDelArgs"), None, &[])
        .object("ObjectDelArgs", &["id:str"])
        .command("qom-get", Some("QomGetArgs"), Some("any"), &[])
        .object("QomGetArgs", &["path:str", "property:str"])
        .command("qom-set", Some("QomSetArgs"), None, &[])
        .object("QomSetArgs", &["path:str", "property:str", "value:any"]);
}

/// QEMU's identifier rule for object ids: a letter, then letters, digits, `-`, `.`, `_`.
fn well_formed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// `limits` applied over `base`: only the members given change.
fn apply_limits(base: &Limits, given: Option<&Value>) -> QmpResult<Limits> {
    let mut limits = base.clone();
    let Some(Value::Object(m)) = given else {
        return Ok(limits);
    };
    let out_of_range =
        || QmpError::generic("bps/iops/max values must be within [0, 1000000000000000]");
    let get = |key: &str| -> QmpResult<Option<u64>> {
        match m.get(key).and_then(Value::as_i64) {
            None => Ok(None),
            Some(v) => u64::try_from(v).map(Some).map_err(|_| out_of_range()),
        }
    };
    for kind in Kind::ALL {
        let name = kind.name();
        let old = limits.get(kind);
        let new = Limit {
            avg: get(name)?.unwrap_or(old.avg),
            max: get(&format!("{name}-max"))?.unwrap_or(old.max),
            max_length: get(&format!("{name}-max-length"))?.unwrap_or(old.max_length),
        };
        limits.set(kind, new);
    }
    if let Some(size) = get("iops-size")? {
        limits.iops_size = size;
    }
    limits.check().map_err(QmpError::generic)?;
    Ok(limits)
}

fn limits_value(l: &Limits) -> Value {
    let mut m = Map::new();
    for kind in Kind::ALL {
        let Limit {
            avg,
            max,
            max_length,
        } = l.get(kind);
        m.insert(kind.name().into(), json!(avg));
        m.insert(format!("{}-max", kind.name()), json!(max));
        m.insert(format!("{}-max-length", kind.name()), json!(max_length));
    }
    m.insert("iops-size".into(), json!(l.iops_size));
    Value::Object(m)
}

/// `object-add`.
pub fn add(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
    if !well_formed(id) {
        return Err(QmpError::generic("Parameter 'id' expects an identifier"));
    }
    if ctl.nodes.throttle_groups.contains_key(id) {
        return Err(QmpError::generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    // The `x-` properties are the members of `limits` one by one, set after it (they win).
    let legacy: Map<String, Value> = args
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("x-").map(|k| (k.to_owned(), v.clone())))
        .collect();
    if legacy.values().any(|v| v.as_i64().is_some_and(|n| n < 0)) {
        return Err(QmpError::generic("Property values cannot be negative"));
    }
    let mut given = match args.get("limits") {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    given.extend(legacy);
    let limits = apply_limits(&Limits::default(), Some(&Value::Object(given)))?;
    ctl.nodes
        .throttle_groups
        .insert(id.to_owned(), ThrottleGroup::new(limits));
    Ok(json!({}))
}

/// `object-del`.
pub fn del(ctl: &mut Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let id = args.get("id").and_then(Value::as_str).unwrap_or_default();
    let group = ctl
        .nodes
        .throttle_groups
        .get(id)
        .ok_or_else(|| QmpError::generic(format!("object '{id}' not found")))?;
    if group.users() > 0 {
        return Err(QmpError::generic(format!(
            "object '{id}' is in use, can not be deleted"
        )));
    }
    ctl.nodes.throttle_groups.remove(id);
    Ok(json!({}))
}

/// The group `path` names (its id, or `/objects/<id>`), as QEMU resolves it.
fn resolve(ctl: &Control, path: &str) -> QmpResult<Arc<ThrottleGroup>> {
    let id = path.strip_prefix("/objects/").unwrap_or(path);
    ctl.nodes.throttle_groups.get(id).cloned().ok_or_else(|| {
        QmpError::new(
            qmp::ErrorClass::DeviceNotFound,
            format!("Device '{path}' not found"),
        )
    })
}

fn property(args: &Map<String, Value>) -> &str {
    args.get("property")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// `qom-get` of a throttle group's `limits`.
pub fn get(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let path = args.get("path").and_then(Value::as_str).unwrap_or_default();
    let group = resolve(ctl, path)?;
    match property(args) {
        "limits" => Ok(limits_value(&group.limits())),
        other => Err(QmpError::generic(format!("Property '{other}' not found"))),
    }
}

/// `qom-set` of a throttle group's `limits`: the members given change, at once.
pub fn set(ctl: &Control, args: &Map<String, Value>) -> QmpResult<Value> {
    let path = args.get("path").and_then(Value::as_str).unwrap_or_default();
    let group = resolve(ctl, path)?;
    match property(args) {
        "limits" => {
            let limits = apply_limits(&group.limits(), args.get("value"))?;
            group.set_limits(limits);
            Ok(json!({}))
        }
        other => Err(QmpError::generic(format!("Property '{other}' not found"))),
    }
}
