//! Nodes (PROTOCOL §8): the record every server owns or mirrors, and the pure
//! validation of `PUT /nodes/{id}` and `POST /nodes/{id}/value` bodies.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const SERVER: &str = "Server";
pub const DATA_POINT: &str = "DataPoint";
pub const TRIGGER_HIGH: &str = "Trigger.HighThreshold";
pub const TRIGGER_LOW: &str = "Trigger.LowThreshold";
pub const EXECUTOR_SET_VALUE: &str = "Executor.SetValue";
pub const COMPUTE: &str = "Compute";
pub const WEBHOOK: &str = "OutgoingWebHook";

/// Every type a client may create.
pub const TYPES: &[&str] = &[
    DATA_POINT,
    TRIGGER_HIGH,
    TRIGGER_LOW,
    EXECUTOR_SET_VALUE,
    COMPUTE,
    WEBHOOK,
];

/// Most targets or inputs one node may list.
pub const MAX_REFS: usize = 64;

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
    /// Length of the automation chain that made this change (0: a person or a
    /// client). Travels with values so loops across servers are cut too.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hops: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A reference to a node on any server.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ref {
    pub host: String,
    pub id: String,
}

impl Ref {
    /// Reads a `{host, id}` at `field` of `meta`.
    pub fn from_meta(meta: &Value, field: &str) -> Option<Ref> {
        serde_json::from_value(meta.get(field)?.clone()).ok()
    }

    /// Reads a list of references at `field`.
    pub fn list(meta: &Value, field: &str) -> Vec<Ref> {
        meta.get(field)
            .and_then(|v| serde_json::from_value(v.clone()).ok())
            .unwrap_or_default()
    }
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
    check_value_at(v, "value")
}

fn check_value_at(v: &Value, field: &str) -> Result<(), String> {
    match v {
        Value::Array(_) | Value::Object(_) => Err(field_err(
            field,
            "must be a number, string, true/false or null",
        )),
        Value::String(s) if s.len() > 64 * 1024 => {
            Err(field_err(field, "string longer than 64 KiB"))
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

fn check_ref(v: Option<&Value>, field: &str) -> Result<Ref, String> {
    let o = v
        .and_then(Value::as_object)
        .ok_or_else(|| field_err(field, "must be {\"host\": <installId>, \"id\": <node id>}"))?;
    let host = o.get("host").and_then(Value::as_str).unwrap_or("");
    let id = o.get("id").and_then(Value::as_str).unwrap_or("");
    if !crate::util::is_uuid(host) {
        return Err(field_err(
            &format!("{field}.host"),
            "must be a server's installId",
        ));
    }
    if !valid_id(id) {
        return Err(field_err(&format!("{field}.id"), "must be a node id"));
    }
    Ok(Ref {
        host: host.to_ascii_lowercase(),
        id: id.to_string(),
    })
}

fn check_refs(m: &Map<String, Value>, key: &str, required: bool) -> Result<Value, String> {
    let field = &format!("meta.{key}");
    let list = match m.get(key) {
        None | Some(Value::Null) if !required => return Ok(Value::Array(Vec::new())),
        Some(Value::Array(a)) => a,
        _ => return Err(field_err(field, "must be a list of {\"host\", \"id\"}")),
    };
    if list.len() > MAX_REFS || (required && list.is_empty()) {
        return Err(field_err(field, format!("must list 1 to {MAX_REFS} nodes")));
    }
    let refs: Vec<Ref> = list
        .iter()
        .enumerate()
        .map(|(i, v)| check_ref(Some(v), &format!("{field}[{i}]")))
        .collect::<Result<_, _>>()?;
    Ok(serde_json::to_value(refs).expect("refs serialize"))
}

fn check_number(m: &Map<String, Value>, key: &str, default: Option<f64>) -> Result<f64, String> {
    let field = &format!("meta.{key}");
    match m.get(key) {
        None | Some(Value::Null) => {
            default.ok_or_else(|| field_err(field, "is missing (a number)"))
        }
        Some(v) => {
            crate::automation::numeric(v).ok_or_else(|| field_err(field, "must be a number"))
        }
    }
}

/// Checks the `meta` a type needs, fills its defaults, and resets the fields the
/// server manages itself (a trigger's `armed`, a compute's `value`, a webhook's results).
fn validate_meta(kind: &str, mut meta: Value) -> Result<Value, String> {
    let m = meta.as_object_mut().expect("meta is an object here");
    match kind {
        DATA_POINT => {
            let v = m.entry("value").or_insert(Value::Null);
            check_value_at(v, "meta.value")?;
            match m.get("unit") {
                None | Some(Value::Null) | Some(Value::String(_)) => {}
                Some(_) => return Err(field_err("meta.unit", "must be a string")),
            }
        }
        TRIGGER_HIGH | TRIGGER_LOW => {
            let src = check_ref(m.get("source"), "meta.source")?;
            let threshold = check_number(m, "threshold", None)?;
            let hysteresis = check_number(m, "hysteresis", Some(0.0))?;
            if hysteresis < 0.0 {
                return Err(field_err("meta.hysteresis", "must not be negative"));
            }
            let targets = check_refs(m, "targets", false)?;
            m.insert("source".into(), serde_json::to_value(src).expect("ref"));
            m.insert("threshold".into(), threshold.into());
            m.insert("hysteresis".into(), hysteresis.into());
            m.insert("targets".into(), targets);
            m.insert("armed".into(), Value::Bool(true));
        }
        EXECUTOR_SET_VALUE => {
            let target = check_ref(m.get("target"), "meta.target")?;
            let value = m.get("value").cloned().unwrap_or(Value::Null);
            check_value_at(&value, "meta.value")?;
            m.insert("target".into(), serde_json::to_value(target).expect("ref"));
            m.insert("value".into(), value);
        }
        COMPUTE => {
            let inputs = check_refs(m, "inputs", true)?;
            let op = m.get("op").and_then(Value::as_str).unwrap_or("");
            if crate::automation::Op::parse(op).is_none() {
                return Err(field_err("meta.op", "must be avg, min, max, sum or count"));
            }
            let targets = check_refs(m, "targets", false)?;
            m.insert("inputs".into(), inputs);
            m.insert("targets".into(), targets);
            m.insert("value".into(), Value::Null);
        }
        WEBHOOK => {
            let url = m.get("url").and_then(Value::as_str).unwrap_or("");
            let rest = url
                .strip_prefix("http://")
                .or_else(|| url.strip_prefix("https://"))
                .filter(|r| !r.is_empty() && !r.starts_with('/') && url.len() <= 2048)
                .ok_or_else(|| field_err("meta.url", "must be an http:// or https:// URL"))?;
            let _ = rest;
            let method = match m.get("method") {
                None | Some(Value::Null) => "POST".to_string(),
                Some(Value::String(s))
                    if ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&s.as_str()) =>
                {
                    s.clone()
                }
                Some(_) => {
                    return Err(field_err(
                        "meta.method",
                        "must be GET, POST, PUT, PATCH or DELETE",
                    ));
                }
            };
            for (field, default) in [("body", ""), ("contentType", "application/json")] {
                match m.get(field) {
                    None | Some(Value::Null) => {
                        m.insert(field.into(), default.into());
                    }
                    Some(Value::String(s)) if s.len() <= 64 * 1024 => {}
                    Some(_) => {
                        return Err(field_err(
                            &format!("meta.{field}"),
                            "must be a string (at most 64 KiB)",
                        ));
                    }
                }
            }
            m.insert("method".into(), method.into());
            for managed in ["lastError", "lastStatus"] {
                m.remove(managed);
            }
            m.insert("failures".into(), 0.into());
        }
        SERVER => return Err("the Server node is made by the server itself".into()),
        other => {
            return Err(field_err(
                "type",
                format!("unknown node type {other:?} (known: {})", TYPES.join(", ")),
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

/// The body of `POST /values`: `{"values":[{"id":"…","value":…},…]}`, at most
/// [`proto::MAX_BATCH_VALUES`] entries. Errors name the entry (`values[3].id`).
pub fn parse_values_body(body: &Value) -> Result<Vec<(String, Value)>, String> {
    let list = body
        .as_object()
        .and_then(|o| o.get("values"))
        .and_then(Value::as_array)
        .ok_or_else(|| {
            "body must be {\"values\": [{\"id\": ..., \"value\": ...}, ...]}".to_string()
        })?;
    if list.is_empty() {
        return Err(field_err("values", "is empty"));
    }
    if list.len() > crate::proto::MAX_BATCH_VALUES {
        return Err(field_err(
            "values",
            format!("more than {} entries", crate::proto::MAX_BATCH_VALUES),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, e)| {
            let id = e
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| field_err(&format!("values[{i}].id"), "must be a node id"))?;
            let v = e
                .get("value")
                .ok_or_else(|| field_err(&format!("values[{i}].value"), "is missing"))?;
            check_value_at(v, &format!("values[{i}].value"))?;
            Ok((id.to_string(), v.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ME: &str = "11111111-2222-4333-8444-555555555555";

    #[test]
    fn value_batches_are_checked_entry_by_entry() {
        let ok =
            parse_values_body(&json!({"values":[{"id":"a","value":1},{"id":"b","value":"x"}]}))
                .unwrap();
        assert_eq!(ok, vec![("a".into(), json!(1)), ("b".into(), json!("x"))]);
        let e =
            parse_values_body(&json!({"values":[{"id":"a","value":1},{"value":2}]})).unwrap_err();
        assert!(e.contains("values[1].id"), "{e}");
        let e = parse_values_body(&json!({"values":[{"id":"a","value":[1]}]})).unwrap_err();
        assert!(e.contains("values[0].value"), "{e}");
        assert!(
            parse_values_body(&json!({"values":[]}))
                .unwrap_err()
                .contains("empty")
        );
        assert!(parse_values_body(&json!({"value":1})).is_err());
        let many: Vec<_> = (0..=crate::proto::MAX_BATCH_VALUES)
            .map(|i| json!({"id":"a","value":i}))
            .collect();
        let e = parse_values_body(&json!({ "values": many })).unwrap_err();
        assert!(e.contains("more than"), "{e}");
    }

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
                "'meta.value'",
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
            (
                json!({"type":"Trigger.HighThreshold","name":"t","meta":{"threshold":1}}),
                "'meta.source'",
            ),
            (
                json!({"type":"Trigger.HighThreshold","name":"t","meta":{"source":{"host":"x","id":"a"},"threshold":1}}),
                "'meta.source.host'",
            ),
            (
                json!({"type":"Trigger.LowThreshold","name":"t","meta":{"source":{"host":ME,"id":"a"}}}),
                "'meta.threshold'",
            ),
            (
                json!({"type":"Trigger.LowThreshold","name":"t","meta":{"source":{"host":ME,"id":"a"},"threshold":"5"}}),
                "'meta.threshold'",
            ),
            (
                json!({"type":"Trigger.HighThreshold","name":"t","meta":{"source":{"host":ME,"id":"a"},"threshold":5,"hysteresis":-1}}),
                "'meta.hysteresis'",
            ),
            (
                json!({"type":"Trigger.HighThreshold","name":"t","meta":{"source":{"host":ME,"id":"a"},"threshold":5,"targets":[{"host":ME}]}}),
                "'meta.targets[0].id'",
            ),
            (
                json!({"type":"Executor.SetValue","name":"e","meta":{"value":1}}),
                "'meta.target'",
            ),
            (
                json!({"type":"Executor.SetValue","name":"e","meta":{"target":{"host":ME,"id":"a"},"value":[1]}}),
                "'meta.value'",
            ),
            (
                json!({"type":"Compute","name":"c","meta":{"op":"avg"}}),
                "'meta.inputs'",
            ),
            (
                json!({"type":"Compute","name":"c","meta":{"op":"avg","inputs":[]}}),
                "'meta.inputs'",
            ),
            (
                json!({"type":"Compute","name":"c","meta":{"op":"median","inputs":[{"host":ME,"id":"a"}]}}),
                "'meta.op'",
            ),
            (
                json!({"type":"OutgoingWebHook","name":"w","meta":{"url":"ftp://x"}}),
                "'meta.url'",
            ),
            (
                json!({"type":"OutgoingWebHook","name":"w","meta":{"url":"http://x","method":"BREW"}}),
                "'meta.method'",
            ),
            (
                json!({"type":"OutgoingWebHook","name":"w","meta":{"url":"http://x","body":5}}),
                "'meta.body'",
            ),
        ];
        for (body, want) in cases {
            let e = validate_put("t1", &body, ME).unwrap_err();
            assert!(e.contains(want), "{body}: {e}");
        }
    }

    #[test]
    fn automation_types_get_defaults_and_managed_fields() {
        let src = json!({"host": ME, "id": "temp"});
        let d = validate_put("t", &json!({"type":"Trigger.HighThreshold","name":"t","meta":{"source":src,"threshold":25,"armed":false}}), ME).unwrap();
        assert_eq!(d.meta["hysteresis"], json!(0.0));
        assert_eq!(d.meta["targets"], json!([]));
        assert_eq!(
            d.meta["armed"],
            json!(true),
            "a new trigger is armed whatever the client says"
        );
        let d = validate_put(
            "c",
            &json!({"type":"Compute","name":"c","meta":{"op":"avg","inputs":[src],"value":99}}),
            ME,
        )
        .unwrap();
        assert_eq!(
            d.meta["value"],
            Value::Null,
            "the server computes the value"
        );
        let d = validate_put("w", &json!({"type":"OutgoingWebHook","name":"w","meta":{"url":"https://example.org/x","lastError":"old"}}), ME).unwrap();
        assert_eq!(d.meta["method"], "POST");
        assert_eq!(d.meta["contentType"], "application/json");
        assert_eq!(d.meta["failures"], 0);
        assert!(d.meta.get("lastError").is_none());
        let d = validate_put(
            "e",
            &json!({"type":"Executor.SetValue","name":"e","meta":{"target":src,"value":true}}),
            ME,
        )
        .unwrap();
        assert_eq!(
            Ref::from_meta(&d.meta, "target"),
            Some(Ref {
                host: ME.into(),
                id: "temp".into()
            })
        );
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
            hops: 0,
        };
        let v = serde_json::to_value(&n).unwrap();
        assert_eq!(v["type"], "DataPoint");
        assert!(v.get("hops").is_none(), "hops is left out when 0");
        assert_eq!(v["parent"], Value::Null);
        let back: Node = serde_json::from_value(v).unwrap();
        assert_eq!(back, n);
    }
}
