//! Nodes (PROTOCOL §8): the record every server owns or mirrors, and the pure
//! validation of `PUT /nodes/{id}` and `POST /nodes/{id}/value` bodies.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const SERVER: &str = "Server";
pub const DATA_POINT: &str = "DataPoint";

/// Node states.
pub const STATES: &[&str] = &["NONE", "OK", "WARN", "ERROR", "EXECUTED", "STALE"];

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub host: String,
    #[serde(default)]
    pub parent: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default = "state_none")]
    pub state: String,
    #[serde(default)]
    pub meta: Value,
    #[serde(default)]
    pub timestamp: u64,
    #[serde(default)]
    pub version: u64,
}

fn state_none() -> String {
    "NONE".into()
}

/// What a client may set with `PUT /nodes/{id}`; the server adds id, host, version, time.
#[derive(Clone, Debug, PartialEq)]
pub struct Draft {
    pub parent: Option<String>,
    pub kind: String,
    pub name: String,
    pub state: String,
    pub meta: Value,
}

/// Node ids: 1 to 128 of `A-Z a-z 0-9 . _ : -` (UUIDs recommended).
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

fn field_err(field: &str, what: impl std::fmt::Display) -> String {
    format!("field '{field}': {what}")
}

/// A data point value: number, string, bool or null.
pub fn check_value(v: &Value) -> Result<(), String> {
    match v {
        Value::Array(_) | Value::Object(_) => Err(field_err(
            "value",
            "must be a number, string, true/false or null",
        )),
        Value::String(s) if s.len() > 64 * 1024 => {
            Err(field_err("value", "string longer than 64 KiB"))
        }
        _ => Ok(()),
    }
}

/// Validates a PUT body for node `id` on the server `own_host`.
pub fn validate_put(id: &str, body: &Value, own_host: &str) -> Result<Draft, String> {
    let Value::Object(o) = body else {
        return Err("body must be a JSON object".into());
    };
    if let Some(v) = o.get("id") {
        if v.as_str() != Some(id) {
            return Err(field_err("id", "differs from the id in the path"));
        }
    }
    if let Some(h) = o.get("host") {
        if !h.is_null() && h.as_str() != Some(own_host) {
            return Err(field_err(
                "host",
                "names another server; a node can only be created on its owner",
            ));
        }
    }
    let kind = match o.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(field_err("type", "must be a string")),
        None => return Err(field_err("type", "is missing")),
    };
    let name = match o.get("name") {
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= 256 => s.clone(),
        Some(Value::String(_)) => return Err(field_err("name", "must be 1 to 256 characters")),
        Some(_) => return Err(field_err("name", "must be a string")),
        None => return Err(field_err("name", "is missing")),
    };
    let parent = match o.get("parent") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if valid_id(p) => Some(p.clone()),
        Some(_) => return Err(field_err("parent", "must be a node id or null")),
    };
    let state = match o.get("state") {
        None | Some(Value::Null) => "NONE".to_string(),
        Some(Value::String(s)) if STATES.contains(&s.as_str()) && s != "STALE" => s.clone(),
        Some(_) => {
            return Err(field_err(
                "state",
                "must be one of NONE, OK, WARN, ERROR, EXECUTED",
            ));
        }
    };
    let meta = match o.get("meta") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(m @ Value::Object(_)) => m.clone(),
        Some(_) => return Err(field_err("meta", "must be an object")),
    };
    let meta = validate_meta(&kind, meta)?;
    Ok(Draft {
        parent,
        kind,
        name,
        state,
        meta,
    })
}

/// Checks the `meta` a type needs and fills its defaults.
fn validate_meta(kind: &str, mut meta: Value) -> Result<Value, String> {
    let m = meta.as_object_mut().expect("meta is an object here");
    match kind {
        DATA_POINT => {
            let v = m.entry("value").or_insert(Value::Null);
            check_value(v).map_err(|e| format!("meta.{e}"))?;
            match m.get("unit") {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(_) => return Err(field_err("meta.unit", "must be a string")),
            }
        }
        SERVER => return Err("the Server node is made by the server itself".into()),
        other => {
            return Err(field_err(
                "type",
                format!("unknown node type {other:?} (known: DataPoint)"),
            ));
        }
    }
    Ok(meta)
}

/// Extracts the value from a `POST /nodes/{id}/value` body.
pub fn parse_value_body(body: &Value) -> Result<Value, String> {
    let v = body
        .as_object()
        .and_then(|o| o.get("value"))
        .ok_or_else(|| "body must be {\"value\": ...}".to_string())?;
    check_value(v)?;
    Ok(v.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ME: &str = "11111111-2222-4333-8444-555555555555";

    #[test]
    fn good_data_point() {
        let d = validate_put(
            "t1",
            &json!({"type":"DataPoint","name":"Temp","meta":{"value":21.5,"unit":"°C"}}),
            ME,
        )
        .unwrap();
        assert_eq!(d.kind, "DataPoint");
        assert_eq!(d.state, "NONE");
        assert_eq!(d.meta["value"], json!(21.5));
        let d = validate_put("t2", &json!({"type":"DataPoint","name":"x","host":ME}), ME).unwrap();
        assert_eq!(d.meta, json!({"value": null}));
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!([]), "JSON object"),
            (json!({"name":"x"}), "'type'"),
            (json!({"type":"DataPoint"}), "'name'"),
            (json!({"type":"DataPoint","name":""}), "'name'"),
            (json!({"type":"Gizmo","name":"x"}), "unknown node type"),
            (
                json!({"type":"DataPoint","name":"x","host":"other"}),
                "'host'",
            ),
            (json!({"type":"DataPoint","name":"x","id":"zz"}), "'id'"),
            (json!({"type":"DataPoint","name":"x","meta":[]}), "'meta'"),
            (
                json!({"type":"DataPoint","name":"x","meta":{"value":[1]}}),
                "meta.field 'value'",
            ),
            (
                json!({"type":"DataPoint","name":"x","meta":{"unit":3}}),
                "'meta.unit'",
            ),
            (
                json!({"type":"DataPoint","name":"x","state":"BAD"}),
                "'state'",
            ),
            (
                json!({"type":"DataPoint","name":"x","parent":5}),
                "'parent'",
            ),
            (json!({"type":"Server","name":"x"}), "made by the server"),
        ];
        for (body, want) in cases {
            let e = validate_put("t1", &body, ME).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn ids_and_values() {
        assert!(valid_id("6f1c-ab_1.2:x"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"a".repeat(129)));
        assert_eq!(parse_value_body(&json!({"value": true})), Ok(json!(true)));
        assert!(parse_value_body(&json!({"v": 1})).is_err());
        assert!(parse_value_body(&json!({"value": {"a":1}})).is_err());
    }

    #[test]
    fn node_json_shape() {
        let n = Node {
            id: "a".into(),
            host: ME.into(),
            parent: None,
            kind: "DataPoint".into(),
            name: "n".into(),
            state: "NONE".into(),
            meta: json!({"value": 1}),
            timestamp: 5,
            version: 7,
        };
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["type"], "DataPoint");
        assert_eq!(v["parent"], Value::Null);
        let back: Node = serde_json::from_value(v).unwrap();
        assert_eq!(back, n);
    }
}
