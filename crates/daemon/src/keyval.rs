//! QEMU's `key=value` option syntax, turned into the JSON object a QMP command would carry.
//!
//! `driver=qcow2,file.driver=file,file.filename=a,,b.qcow2` becomes
//! `{"driver": "qcow2", "file": {"driver": "file", "filename": "a,b.qcow2"}}`:
//! - `,` separates pairs; `,,` inside a value is a literal comma;
//! - dots in keys make nested objects; keys that are all digits at one level make an array
//!   (`bitmaps.0=a,bitmaps.1=b`), which must count up from 0 without gaps;
//! - every value stays a string: the schema converts it to the type the member has
//!   ([`qmp::Schema::check_arguments`] with `keyval`);
//! - an option may name an implied key for a first element without `=` (`--chardev
//!   socket,…` means `backend=socket`);
//! - a value starting with `{` is JSON instead (`--blockdev '{"driver": …}'`).

use serde_json::{Map, Value};

/// Parses `text`; `implied` names the key of a leading element without `=`.
pub fn parse(text: &str, implied: Option<&str>) -> Result<Map<String, Value>, String> {
    let mut root = Map::new();
    let mut rest = text;
    let mut first = true;
    while !rest.is_empty() {
        let (pair, next) = split_pair(rest);
        rest = next;
        let (key, value) = match pair.find('=') {
            Some(eq) if !pair[..eq].contains(',') => {
                (pair[..eq].to_owned(), unescape(&pair[eq + 1..]))
            }
            _ => match (first, implied) {
                (true, Some(k)) => (k.to_owned(), unescape(pair)),
                _ => return Err(format!("Expected '=' after parameter '{}'", unescape(pair))),
            },
        };
        first = false;
        insert(&mut root, &key, value)?;
    }
    lists_from_numbered_keys(&mut root)?;
    Ok(root)
}

/// Splits off the first `key=value` pair; `,,` does not split.
fn split_pair(s: &str) -> (&str, &str) {
    let bytes = s.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b',' {
            if bytes.get(i + 1) == Some(&b',') {
                i += 2;
                continue;
            }
            return (&s[..i], &s[i + 1..]);
        }
        i += 1;
    }
    (s, "")
}

fn unescape(s: &str) -> String {
    s.replace(",,", ",")
}

fn valid_key_part(part: &str) -> bool {
    !part.is_empty()
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if !parts.iter().all(|p| valid_key_part(p)) {
        return Err(format!("Invalid parameter '{key}'"));
    }
    let (last, path) = parts
        .split_last()
        .ok_or_else(|| format!("Invalid parameter '{key}'"))?;
    let mut map = root;
    for (i, part) in path.iter().enumerate() {
        let entry = map
            .entry((*part).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(m) => m,
            _ => {
                return Err(format!(
                    "Parameter '{}' used inconsistently",
                    parts[..=i].join(".")
                ))
            }
        };
    }
    match map.get(*last) {
        Some(Value::Object(_)) => Err(format!("Parameter '{key}' used inconsistently")),
        // QEMU: a repeated key overrides the earlier value.
        _ => {
            map.insert((*last).to_owned(), Value::String(value));
            Ok(())
        }
    }
}

/// Objects whose keys are all decimal numbers become arrays, recursively.
fn lists_from_numbered_keys(map: &mut Map<String, Value>) -> Result<(), String> {
    for (key, value) in map.iter_mut() {
        let Value::Object(inner) = value else {
            continue;
        };
        lists_from_numbered_keys(inner)?;
        let numbered =
            !inner.is_empty() && inner.keys().all(|k| k.bytes().all(|b| b.is_ascii_digit()));
        if !numbered {
            if inner.keys().any(|k| k.bytes().all(|b| b.is_ascii_digit())) {
                return Err(format!(
                    "Parameter '{key}' mixes list indices and member names"
                ));
            }
            continue;
        }
        let mut items: Vec<(usize, Value)> = Vec::with_capacity(inner.len());
        for (k, v) in std::mem::take(inner) {
            let idx: usize = k
                .parse()
                .map_err(|_| format!("Invalid list index '{key}.{k}'"))?;
            items.push((idx, v));
        }
        items.sort_by_key(|(i, _)| *i);
        if items.iter().enumerate().any(|(pos, (i, _))| pos != *i) {
            return Err(format!(
                "Parameter '{key}.{}' is missing",
                first_gap(&items)
            ));
        }
        *value = Value::Array(items.into_iter().map(|(_, v)| v).collect());
    }
    Ok(())
}

fn first_gap(items: &[(usize, Value)]) -> usize {
    items
        .iter()
        .enumerate()
        .find(|(pos, (i, _))| pos != i)
        .map_or(items.len(), |(pos, _)| pos)
}

/// Parses an option argument that may be JSON (`{…}`) or key=value.
pub fn parse_option(
    text: &str,
    implied: Option<&str>,
) -> Result<(Map<String, Value>, bool), String> {
    if text.trim_start().starts_with('{') {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Ok((m, false)),
            Ok(_) => Err("JSON option must be an object".into()),
            Err(e) => Err(format!("JSON parse error, {e}")),
        }
    } else {
        parse(text, implied).map(|m| (m, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(s: &str) -> Value {
        Value::Object(parse(s, None).expect("parse"))
    }

    #[test]
    fn dotted_keys_nest() {
        assert_eq!(
            kv("driver=qcow2,node-name=disk0,file.driver=file,file.filename=a.qcow2"),
            json!({"driver": "qcow2", "node-name": "disk0",
                   "file": {"driver": "file", "filename": "a.qcow2"}})
        );
    }

    #[test]
    fn double_comma_escapes() {
        assert_eq!(
            kv("filename=a,,b,,,,c.img,x=1"),
            json!({"filename": "a,b,,c.img", "x": "1"})
        );
    }

    #[test]
    fn numbered_keys_make_lists() {
        assert_eq!(
            kv("e.0.event=read_aio,e.1.event=write_aio,e.0.errno=5"),
            json!({"e": [{"event": "read_aio", "errno": "5"}, {"event": "write_aio"}]})
        );
        assert!(parse("e.0=a,e.2=b", None).is_err(), "gap");
        assert!(parse("e.0=a,e.x=b", None).is_err(), "mixed");
    }

    #[test]
    fn implied_key_and_errors() {
        assert_eq!(
            Value::Object(parse("socket,id=m", Some("backend")).expect("ok")),
            json!({"backend": "socket", "id": "m"})
        );
        assert_eq!(
            parse("socket,id=m", None).expect_err("no implied"),
            "Expected '=' after parameter 'socket'"
        );
        assert!(parse("a=1,a.b=2", None).is_err());
        assert!(parse("a..b=1", None).is_err());
    }

    #[test]
    fn json_form() {
        let (m, keyval) = parse_option(r#"{"driver": "null-co", "size": 5}"#, None).expect("ok");
        assert!(!keyval);
        assert_eq!(m["size"], json!(5));
    }
}
