//! The schema: the commands, events and types we implement, described once as data.
//!
//! One description serves two purposes:
//! - **checking arguments** before a handler sees them, with QEMU's error messages (missing,
//!   unexpected, mistyped members; enum values; union tags; alternates), and, for start-up
//!   options given as `key=value` strings, turning strings into the integers, sizes and
//!   booleans the schema asks for (QEMU's keyval input visitor);
//! - **introspection** (`query-qmp-schema`) in QEMU's format, with type names masked as
//!   numbers, so that libvirt-style feature probing sees exactly what we accept.
//!
//! Member specs use QAPI's spelling: `"name:type"`, a leading `*` for optional members, and
//! `[type]` for arrays. Builtins: `str`, `int`, `int64`, `uint64`, `size`, `number`, `bool`,
//! `null`, `any`.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use serde_json::{json, Map, Number, Value};

use crate::error::{QmpError, QmpResult};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Builtin {
    Str,
    Int,
    Uint,
    Uint32,
    Int32,
    Size,
    Number,
    Bool,
    Null,
    Any,
}

impl Builtin {
    fn parse(name: &str) -> Option<Builtin> {
        Some(match name {
            "str" => Builtin::Str,
            "int" | "int64" => Builtin::Int,
            "uint64" => Builtin::Uint,
            "uint32" => Builtin::Uint32,
            "int32" => Builtin::Int32,
            "size" => Builtin::Size,
            "number" => Builtin::Number,
            "bool" => Builtin::Bool,
            "null" => Builtin::Null,
            "any" => Builtin::Any,
            _ => return None,
        })
    }

    /// The name introspection shows (all integer types are `int`).
    fn public_name(self) -> &'static str {
        match self {
            Builtin::Str => "str",
            Builtin::Int | Builtin::Uint | Builtin::Uint32 | Builtin::Int32 | Builtin::Size => {
                "int"
            }
            Builtin::Number => "number",
            Builtin::Bool => "bool",
            Builtin::Null => "null",
            Builtin::Any => "any",
        }
    }

    fn json_type(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int | Builtin::Uint | Builtin::Uint32 | Builtin::Int32 | Builtin::Size => {
                "int"
            }
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "value",
        }
    }

    /// The word QEMU uses in "expected: …".
    fn expected(self) -> &'static str {
        match self {
            Builtin::Str => "string",
            Builtin::Int | Builtin::Uint | Builtin::Uint32 | Builtin::Int32 | Builtin::Size => {
                "integer"
            }
            Builtin::Number => "number",
            Builtin::Bool => "boolean",
            Builtin::Null => "null",
            Builtin::Any => "value",
        }
    }
}

/// A member of an object type.
#[derive(Clone, Debug)]
struct Member {
    name: &'static str,
    ty: String,
    optional: bool,
    features: Vec<&'static str>,
}

impl Member {
    fn parse(spec: &'static str) -> Member {
        let (name, ty) = spec.split_once(':').unwrap_or((spec, "str"));
        let (name, optional) = match name.strip_prefix('*') {
            Some(n) => (n, true),
            None => (name, false),
        };
        let (ty, features) = match ty.split_once('@') {
            Some((t, f)) => (t, f.split('@').collect()),
            None => (ty, Vec::new()),
        };
        Member {
            name,
            ty: ty.to_owned(),
            optional,
            features,
        }
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Enum(Vec<&'static str>),
    Object {
        members: Vec<Member>,
        tag: Option<&'static str>,
        variants: Vec<(&'static str, String)>,
    },
    Alternate(Vec<String>),
}

#[derive(Clone, Debug)]
struct TypeDef {
    kind: Kind,
    features: Vec<&'static str>,
}

#[derive(Clone, Debug)]
struct Entity {
    name: &'static str,
    arg_type: Option<String>,
    ret_type: Option<String>,
    features: Vec<&'static str>,
}

/// The schema; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    types: BTreeMap<String, TypeDef>,
    commands: Vec<Entity>,
    events: Vec<Entity>,
}

/// Where in the arguments a value sits, for messages (`file.filename`, `inject-error[1].event`).
#[derive(Clone, Debug, Default)]
struct Path(Vec<Seg>);

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

impl Path {
    fn key(&self, k: &str) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Key(k.to_owned()));
        p
    }

    fn index(&self, i: usize) -> Path {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    fn leaf(&self) -> String {
        match self.0.last() {
            Some(Seg::Key(k)) => k.clone(),
            Some(Seg::Index(i)) => format!("[{i}]"),
            None => String::new(),
        }
    }

    fn full(&self) -> String {
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Key(k) if s.is_empty() => s.push_str(k),
                Seg::Key(k) => {
                    s.push('.');
                    s.push_str(k);
                }
                Seg::Index(i) => {
                    let _ = write!(s, "[{i}]");
                }
            }
        }
        s
    }
}

fn invalid_type(path: &Path, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{}', expected: {expected}",
        path.full()
    ))
}

/// Parses a size the way QEMU's keyval does: a number with an optional k/M/G/T/P/E suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, suffix) = s.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return None,
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift);
    }
    let f: f64 = num.parse().ok()?;
    let v = f * (1u64 << shift) as f64;
    (v.is_finite() && v >= 0.0 && v < u64::MAX as f64).then_some(v as u64)
}

fn parse_int(s: &str) -> Option<i64> {
    let s = s.trim();
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => i64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

impl Schema {
    /// An empty schema.
    pub fn new() -> Self {
        Self::default()
    }

    /// Defines an enumeration.
    pub fn enumeration(&mut self, name: &str, values: &[&'static str]) -> &mut Self {
        self.define(name, Kind::Enum(values.to_vec()))
    }

    /// Defines an object type from member specs.
    pub fn object(&mut self, name: &str, members: &[&'static str]) -> &mut Self {
        self.define(
            name,
            Kind::Object {
                members: members.iter().map(|m| Member::parse(m)).collect(),
                tag: None,
                variants: Vec::new(),
            },
        )
    }

    /// Defines a flat union: base members, the tag member (an enum among them), and the object
    /// type whose members join for each tag value.
    pub fn union(
        &mut self,
        name: &str,
        base: &[&'static str],
        tag: &'static str,
        variants: &[(&'static str, &str)],
    ) -> &mut Self {
        self.define(
            name,
            Kind::Object {
                members: base.iter().map(|m| Member::parse(m)).collect(),
                tag: Some(tag),
                variants: variants
                    .iter()
                    .map(|(c, t)| (*c, (*t).to_owned()))
                    .collect(),
            },
        )
    }

    /// Defines an alternate: a value of the first branch its JSON kind fits.
    pub fn alternate(&mut self, name: &str, branches: &[&str]) -> &mut Self {
        self.define(
            name,
            Kind::Alternate(branches.iter().map(|b| (*b).to_owned()).collect()),
        )
    }

    fn define(&mut self, name: &str, kind: Kind) -> &mut Self {
        self.types.insert(
            name.to_owned(),
            TypeDef {
                kind,
                features: Vec::new(),
            },
        );
        self
    }

    /// Declares a command with its argument and return types (`None`: none).
    pub fn command(
        &mut self,
        name: &'static str,
        args: Option<&str>,
        ret: Option<&str>,
        features: &[&'static str],
    ) -> &mut Self {
        self.commands.push(Entity {
            name,
            arg_type: args.map(str::to_owned),
            ret_type: ret.map(str::to_owned),
            features: features.to_vec(),
        });
        self
    }

    /// Declares an event with its data type.
    pub fn event(&mut self, name: &'static str, data: Option<&str>) -> &mut Self {
        self.events.push(Entity {
            name,
            arg_type: data.map(str::to_owned),
            ret_type: None,
            features: Vec::new(),
        });
        self
    }

    /// Names of the commands, in declaration order.
    pub fn command_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.commands.iter().map(|c| c.name)
    }

    /// True when `name` is a declared command.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.iter().any(|c| c.name == name)
    }

    /// Every type reference resolves; call once in tests.
    pub fn check_complete(&self) -> Result<(), String> {
        let mut refs: Vec<&str> = Vec::new();
        for e in self.commands.iter().chain(&self.events) {
            refs.extend(e.arg_type.as_deref());
            refs.extend(e.ret_type.as_deref());
        }
        for t in self.types.values() {
            match &t.kind {
                Kind::Enum(_) => {}
                Kind::Object {
                    members, variants, ..
                } => {
                    refs.extend(members.iter().map(|m| m.ty.as_str()));
                    refs.extend(variants.iter().map(|(_, t)| t.as_str()));
                }
                Kind::Alternate(b) => refs.extend(b.iter().map(String::as_str)),
            }
        }
        for r in refs {
            let base = r.trim_start_matches('[').trim_end_matches(']');
            if Builtin::parse(base).is_none() && !self.types.contains_key(base) {
                return Err(format!("type '{base}' is used but not defined"));
            }
        }
        Ok(())
    }

    /// Checks (and, for `keyval` input, converts) the arguments of `command`. Unknown commands
    /// are `CommandNotFound`.
    pub fn check_arguments(
        &self,
        command: &str,
        args: &mut Map<String, Value>,
        keyval: bool,
    ) -> QmpResult<()> {
        let entity = self
            .commands
            .iter()
            .find(|c| c.name == command)
            .ok_or_else(|| QmpError::command_not_found(command))?;
        match &entity.arg_type {
            Some(ty) => self.check_object(ty, args, &Path::default(), keyval),
            None => match args.keys().next() {
                Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
                None => Ok(()),
            },
        }
    }

    /// Checks (and, for `keyval` input, converts) an object against the object type `ty`:
    /// for command-line options that are not command arguments (`--nbd-server`).
    pub fn check_type(
        &self,
        ty: &str,
        args: &mut Map<String, Value>,
        keyval: bool,
    ) -> QmpResult<()> {
        self.check_object(ty, args, &Path::default(), keyval)
    }

    fn check(&self, ty: &str, value: &mut Value, path: &Path, keyval: bool) -> QmpResult<()> {
        if let Some(elem) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let Value::Array(items) = value else {
                return Err(invalid_type(path, "array"));
            };
            for (i, item) in items.iter_mut().enumerate() {
                self.check(elem, item, &path.index(i), keyval)?;
            }
            return Ok(());
        }
        if let Some(b) = Builtin::parse(ty) {
            return check_builtin(b, value, path, keyval);
        }
        let def = self
            .types
            .get(ty)
            .ok_or_else(|| QmpError::generic(format!("internal: type '{ty}' is not defined")))?;
        match &def.kind {
            Kind::Enum(values) => match value {
                Value::String(s) if values.contains(&s.as_str()) => Ok(()),
                Value::String(s) => Err(QmpError::generic(format!(
                    "Parameter '{}' does not accept value '{s}'",
                    path.leaf()
                ))),
                _ => Err(invalid_type(path, "string")),
            },
            Kind::Object { .. } => match value {
                Value::Object(map) => self.check_object(ty, map, path, keyval),
                _ => Err(invalid_type(path, "object")),
            },
            Kind::Alternate(branches) => {
                // QEMU names an alternate that fits no branch by its member name alone, and
                // a list element by 'null' (its visitor has no name there).
                let branch = self.pick_branch(branches, value, keyval).ok_or_else(|| {
                    let name = match path.0.last() {
                        Some(Seg::Key(k)) => k.clone(),
                        _ => "null".to_owned(),
                    };
                    QmpError::generic(format!(
                        "Invalid parameter type for '{name}', expected: {ty}"
                    ))
                })?;
                self.check(&branch, value, path, keyval)
            }
        }
    }

    /// The alternate branch a value belongs to, by its JSON kind.
    fn pick_branch(&self, branches: &[String], value: &Value, keyval: bool) -> Option<String> {
        let fits = |b: &String| -> bool {
            let kind = Builtin::parse(b);
            match value {
                Value::Object(_) => {
                    matches!(
                        self.types.get(b.as_str()).map(|d| &d.kind),
                        Some(Kind::Object { .. })
                    )
                }
                Value::String(s) if keyval => match kind {
                    // "" with a null branch was decided above.
                    Some(Builtin::Null) => false,
                    Some(_) => true,
                    None => matches!(
                        self.types.get(b.as_str()).map(|d| &d.kind),
                        Some(Kind::Enum(_))
                    ),
                },
                Value::String(_) => {
                    kind == Some(Builtin::Str)
                        || matches!(
                            self.types.get(b.as_str()).map(|d| &d.kind),
                            Some(Kind::Enum(_))
                        )
                }
                Value::Null => kind == Some(Builtin::Null),
                Value::Bool(_) => kind == Some(Builtin::Bool),
                Value::Number(_) => matches!(
                    kind,
                    Some(
                        Builtin::Int
                            | Builtin::Uint
                            | Builtin::Uint32
                            | Builtin::Int32
                            | Builtin::Size
                            | Builtin::Number
                    )
                ),
                Value::Array(_) => b.starts_with('['),
            }
        };
        // A keyval empty string means null when the alternate allows it.
        if keyval && value.as_str() == Some("") && branches.iter().any(|b| b == "null") {
            return Some("null".to_owned());
        }
        branches.iter().find(|b| fits(b)).cloned()
    }

    /// All members an object (or union, given its tag) accepts, in visiting order.
    fn members_of<'a>(&'a self, ty: &str, map: &Map<String, Value>) -> QmpResult<Vec<&'a Member>> {
        let Some(TypeDef {
            kind:
                Kind::Object {
                    members,
                    tag,
                    variants,
                },
            ..
        }) = self.types.get(ty)
        else {
            return Err(QmpError::generic(format!(
                "internal: '{ty}' is not an object type"
            )));
        };
        let mut all: Vec<&Member> = members.iter().collect();
        let Some(tag) = tag else {
            return Ok(all);
        };
        let Some(Value::String(tag_value)) = map.get(*tag) else {
            // The tag member is checked (missing, mistyped) with the base members.
            return Ok(all);
        };
        if let Some((_, variant)) = variants.iter().find(|(c, _)| c == tag_value) {
            all.extend(self.members_of(variant, map)?);
        }
        Ok(all)
    }

    fn check_object(
        &self,
        ty: &str,
        map: &mut Map<String, Value>,
        path: &Path,
        keyval: bool,
    ) -> QmpResult<()> {
        let members = self.members_of(ty, map)?;
        for m in &members {
            let here = path.key(m.name);
            match map.get_mut(m.name) {
                Some(v) => self.check(&m.ty, v, &here, keyval)?,
                None if m.optional => {}
                None => {
                    return Err(QmpError::generic(format!(
                        "Parameter '{}' is missing",
                        here.full()
                    )))
                }
            }
        }
        if let Some(extra) = map.keys().find(|k| !members.iter().any(|m| m.name == *k)) {
            return Err(QmpError::generic(format!(
                "Parameter '{}' is unexpected",
                path.key(extra).full()
            )));
        }
        Ok(())
    }

    /// The `query-qmp-schema` document.
    pub fn introspect(&self) -> Value {
        let mut masker = Masker::default();
        let mut out = Vec::new();
        for c in &self.commands {
            let mut e = Map::new();
            e.insert("name".into(), json!(c.name));
            e.insert("meta-type".into(), json!("command"));
            e.insert("arg-type".into(), json!(masker.name(c.arg_type.as_deref())));
            e.insert("ret-type".into(), json!(masker.name(c.ret_type.as_deref())));
            if !c.features.is_empty() {
                e.insert("features".into(), json!(c.features));
            }
            out.push(Value::Object(e));
        }
        for ev in &self.events {
            out.push(json!({
                "name": ev.name,
                "meta-type": "event",
                "arg-type": masker.name(ev.arg_type.as_deref()),
            }));
        }
        while let Some(ty) = masker.pending.pop() {
            out.push(self.describe(&ty, &mut masker));
        }
        Value::Array(out)
    }

    fn describe(&self, ty: &str, masker: &mut Masker) -> Value {
        let name = masker.name(Some(ty));
        if let Some(elem) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let elem = masker.name(Some(elem));
            return json!({"name": name, "meta-type": "array", "element-type": elem});
        }
        if let Some(b) = Builtin::parse(ty) {
            return json!({"name": name, "meta-type": "builtin", "json-type": b.json_type()});
        }
        let Some(def) = self.types.get(ty) else {
            return json!({"name": name, "meta-type": "object", "members": []});
        };
        let mut e = Map::new();
        e.insert("name".into(), json!(name));
        match &def.kind {
            Kind::Enum(values) => {
                e.insert("meta-type".into(), json!("enum"));
                let members: Vec<Value> = values.iter().map(|v| json!({"name": v})).collect();
                e.insert("members".into(), Value::Array(members));
                e.insert("values".into(), json!(values));
            }
            Kind::Object {
                members,
                tag,
                variants,
            } => {
                e.insert("meta-type".into(), json!("object"));
                let ms: Vec<Value> = members
                    .iter()
                    .map(|m| {
                        let mut o = Map::new();
                        o.insert("name".into(), json!(m.name));
                        if m.optional {
                            o.insert("default".into(), Value::Null);
                        }
                        o.insert("type".into(), json!(masker.name(Some(&m.ty))));
                        if !m.features.is_empty() {
                            o.insert("features".into(), json!(m.features));
                        }
                        Value::Object(o)
                    })
                    .collect();
                e.insert("members".into(), Value::Array(ms));
                if let Some(tag) = tag {
                    e.insert("tag".into(), json!(tag));
                    let vs: Vec<Value> = variants
                        .iter()
                        .map(|(c, t)| json!({"case": c, "type": masker.name(Some(t))}))
                        .collect();
                    e.insert("variants".into(), Value::Array(vs));
                }
            }
            Kind::Alternate(branches) => {
                e.insert("meta-type".into(), json!("alternate"));
                let ms: Vec<Value> = branches
                    .iter()
                    .map(|b| json!({"type": masker.name(Some(b))}))
                    .collect();
                e.insert("members".into(), Value::Array(ms));
            }
        }
        if !def.features.is_empty() {
            e.insert("features".into(), json!(def.features));
        }
        Value::Object(e)
    }
}

/// Assigns masked names (numbers) to types in order of first use, as QEMU does.
#[derive(Debug, Default)]
struct Masker {
    names: HashMap<String, String>,
    pending: Vec<String>,
    next: usize,
}

impl Masker {
    fn name(&mut self, ty: Option<&str>) -> String {
        // Commands without arguments or result, and events without data, use the empty
        // object type.
        let ty = ty.unwrap_or("");
        if let Some(n) = self.names.get(ty) {
            return n.clone();
        }
        let public = if let Some(b) = Builtin::parse(ty) {
            // Sized integer types share the builtin `int`.
            let p = b.public_name().to_owned();
            if p != ty {
                return self.name(Some(&p));
            }
            p
        } else if let Some(elem) = ty.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            format!("[{}]", self.name(Some(elem)))
        } else {
            let n = self.next.to_string();
            self.next += 1;
            n
        };
        self.names.insert(ty.to_owned(), public.clone());
        self.pending.insert(0, ty.to_owned());
        public
    }
}

fn check_builtin(b: Builtin, value: &mut Value, path: &Path, keyval: bool) -> QmpResult<()> {
    if keyval {
        if let Value::String(s) = value {
            if let Some(converted) = convert_keyval(b, s, path)? {
                *value = converted;
            }
            return Ok(());
        }
    }
    let ok = match (b, &*value) {
        (Builtin::Any, _) => true,
        (Builtin::Str, Value::String(_)) => true,
        (Builtin::Bool, Value::Bool(_)) => true,
        (Builtin::Null, Value::Null) => true,
        (Builtin::Number, Value::Number(_)) => true,
        (Builtin::Int, Value::Number(n)) => n.is_i64() || n.is_u64() && n.as_i64().is_some(),
        (Builtin::Uint32, Value::Number(n)) => {
            let fits = n.as_u64().is_some_and(|v| u32::try_from(v).is_ok());
            in_range(n, fits, "uint32_t", path)?
        }
        (Builtin::Int32, Value::Number(n)) => {
            let fits = n.as_i64().is_some_and(|v| i32::try_from(v).is_ok());
            in_range(n, fits, "int32_t", path)?
        }
        (Builtin::Uint | Builtin::Size, Value::Number(n)) if n.is_i64() && !n.is_u64() => {
            return Err(QmpError::generic(format!(
                "Parameter '{}' expects a non-negative number below 2^64",
                path.full()
            )));
        }
        (Builtin::Uint | Builtin::Size, Value::Number(n)) => n.is_u64(),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(invalid_type(path, b.expected()))
    }
}

/// A sized integer type's check: an integer outside its range gets QEMU's "expects" error; a
/// non-integer number is the wrong type (`Ok(false)`).
fn in_range(n: &Number, fits: bool, type_name: &str, path: &Path) -> QmpResult<bool> {
    if fits {
        Ok(true)
    } else if n.is_i64() || n.is_u64() {
        Err(QmpError::generic(format!(
            "Parameter '{}' expects {type_name}",
            path.full()
        )))
    } else {
        Ok(false)
    }
}

/// Converts a keyval string to the builtin's JSON type (`None`: keep the string).
fn convert_keyval(b: Builtin, s: &str, path: &Path) -> QmpResult<Option<Value>> {
    let bad = |what: &str| QmpError::generic(format!("Parameter '{}' expects {what}", path.full()));
    Ok(match b {
        Builtin::Str | Builtin::Any => None,
        Builtin::Int => Some(Value::from(parse_int(s).ok_or_else(|| bad("integer"))?)),
        Builtin::Uint => {
            let v = parse_int(s)
                .and_then(|v| u64::try_from(v).ok())
                .or_else(|| s.trim().parse::<u64>().ok());
            Some(Value::from(v.ok_or_else(|| bad("uint64"))?))
        }
        Builtin::Uint32 => {
            let v = parse_int(s)
                .and_then(|v| u32::try_from(v).ok())
                .or_else(|| s.trim().parse::<u32>().ok());
            Some(Value::from(v.ok_or_else(|| bad("uint32_t"))?))
        }
        Builtin::Int32 => {
            let v = parse_int(s).and_then(|v| i32::try_from(v).ok());
            Some(Value::from(v.ok_or_else(|| bad("int32_t"))?))
        }
        Builtin::Size => Some(Value::from(
            parse_size(s).ok_or_else(|| bad("a non-negative number below 2^64"))?,
        )),
        Builtin::Number => {
            let f: f64 = s.trim().parse().map_err(|_| bad("number"))?;
            Some(Value::Number(
                Number::from_f64(f).ok_or_else(|| bad("number"))?,
            ))
        }
        Builtin::Bool => Some(Value::Bool(
            parse_bool(s).ok_or_else(|| bad("'on' or 'off'"))?,
        )),
        Builtin::Null if s.is_empty() => Some(Value::Null),
        Builtin::Null => return Err(invalid_type(path, "null")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Schema {
        let mut s = Schema::new();
        s.enumeration("Driver", &["file", "null-co"])
            .enumeration("Event", &["read_aio", "write_aio"])
            .object("File", &["filename:str", "*size:size"])
            .object(
                "Null",
                &[
                    "*size:size",
                    "*read-zeroes:bool",
                    "*max:int32",
                    "*count:uint32",
                ],
            )
            .object("Rule", &["event:Event", "*errno:int"])
            .union(
                "Options",
                &[
                    "driver:Driver",
                    "*node-name:str",
                    "*inject:[Rule]",
                    "*file:Ref",
                ],
                "driver",
                &[("file", "File"), ("null-co", "Null")],
            )
            .alternate("Ref", &["Options", "str"])
            .command("add", Some("Options"), None, &[])
            .command("ping", None, None, &[]);
        s.check_complete().expect("complete");
        s
    }

    fn check(args: Value) -> QmpResult<Value> {
        check_kv(args, false)
    }

    fn check_kv(args: Value, keyval: bool) -> QmpResult<Value> {
        let Value::Object(mut m) = args else {
            panic!("object")
        };
        sample().check_arguments("add", &mut m, keyval)?;
        Ok(Value::Object(m))
    }

    fn err(args: Value) -> String {
        check(args).expect_err("must fail").desc
    }

    #[test]
    fn sized_integers_take_their_range_only() {
        let null = |key: &str, v: Value| json!({"driver": "null-co", key: v});
        assert!(check(null("max", json!(-2147483648i64))).is_ok());
        assert!(check(null("count", json!(4294967295u64))).is_ok());
        assert_eq!(
            err(null("max", json!(3000000000u64))),
            "Parameter 'max' expects int32_t"
        );
        assert_eq!(
            err(null("count", json!(-1))),
            "Parameter 'count' expects uint32_t"
        );
        assert_eq!(
            err(null("max", json!(1.5))),
            "Invalid parameter type for 'max', expected: integer"
        );
        let v = check_kv(null("max", json!("-7")), true).expect("keyval");
        assert_eq!(v["max"], json!(-7));
    }

    #[test]
    fn qemu_messages() {
        assert_eq!(err(json!({})), "Parameter 'driver' is missing");
        assert_eq!(
            err(json!({"driver": "nope"})),
            "Parameter 'driver' does not accept value 'nope'"
        );
        assert_eq!(
            err(json!({"driver": "file"})),
            "Parameter 'filename' is missing"
        );
        assert_eq!(
            err(json!({"driver": "file", "filename": 1})),
            "Invalid parameter type for 'filename', expected: string"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "bogus": 1})),
            "Parameter 'bogus' is unexpected"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "file": {"driver": "file"}})),
            "Parameter 'file.filename' is missing"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "file": 5})),
            "Invalid parameter type for 'file', expected: Ref"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "inject": [{"event": "read_aio"}, {"errno": 5}]})),
            "Parameter 'inject[1].event' is missing"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "inject": [{"event": "x"}]})),
            "Parameter 'event' does not accept value 'x'"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "size": -1})),
            "Parameter 'size' expects a non-negative number below 2^64"
        );
        assert_eq!(
            err(json!({"driver": "null-co", "size": 1.5})),
            "Invalid parameter type for 'size', expected: integer"
        );
        assert!(check(json!({"driver": "null-co", "file": "f0", "size": 5})).is_ok());
        let mut none = Map::new();
        none.insert("x".into(), json!(1));
        assert_eq!(
            sample()
                .check_arguments("ping", &mut none, false)
                .expect_err("x")
                .desc,
            "Parameter 'x' is unexpected"
        );
        assert_eq!(
            sample()
                .check_arguments("nope", &mut Map::new(), false)
                .expect_err("x")
                .class,
            crate::ErrorClass::CommandNotFound
        );
    }

    #[test]
    fn keyval_strings_become_typed() {
        let v = check_kv(
            json!({"driver": "null-co", "size": "1G", "read-zeroes": "on",
                   "inject": [{"event": "read_aio", "errno": "5"}]}),
            true,
        )
        .expect("ok");
        assert_eq!(v["size"], json!(1u64 << 30));
        assert_eq!(v["read-zeroes"], json!(true));
        assert_eq!(v["inject"][0]["errno"], json!(5));
        let e =
            check_kv(json!({"driver": "null-co", "read-zeroes": "maybe"}), true).expect_err("bad");
        assert_eq!(e.desc, "Parameter 'read-zeroes' expects 'on' or 'off'");
    }

    #[test]
    fn introspection_masks_names_and_lists_entities() {
        let doc = sample().introspect();
        let items = doc.as_array().expect("array");
        let add = items.iter().find(|e| e["name"] == "add").expect("add");
        let arg = add["arg-type"].as_str().expect("str");
        assert!(arg.parse::<u32>().is_ok(), "masked: {arg}");
        let args = items.iter().find(|e| e["name"] == arg).expect("defined");
        assert_eq!(args["tag"], "driver");
        let size = args["members"]
            .as_array()
            .expect("members")
            .iter()
            .find(|m| m["name"] == "node-name")
            .expect("member");
        assert_eq!(size["type"], "str");
        assert!(size.get("default").is_some());
        // Every referenced name is defined exactly once.
        let names: Vec<&str> = items.iter().filter_map(|e| e["name"].as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        assert!(items
            .iter()
            .any(|e| e["name"] == "int" && e["json-type"] == "int"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1.5M"), Some(3 << 19));
        assert_eq!(parse_size("1x"), None);
        assert_eq!(parse_size("99999999999E"), None);
    }
}
