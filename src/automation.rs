//! Automation (PROTOCOL §8): the pure rules. Threshold crossing with hysteresis,
//! compute ops, webhook body templates, and the hop limit that cuts loops. The state
//! owner applies them; webhooks and writes to other servers run on workers.

use serde_json::Value;

/// A chain of invocations (trigger → executor → value → trigger ...) is cut after
/// this many hops, across servers too (the count travels with values and invokes).
pub const MAX_HOPS: u32 = 16;

/// Webhook timeout (connect + answer).
pub const WEBHOOK_TIMEOUT_S: u64 = 5;

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Edge {
    /// Fires when the value rises to ≥ threshold.
    High,
    /// Fires when the value falls to ≤ threshold.
    Low,
}

/// One step of an edge-triggered threshold. An armed trigger fires once when the
/// value reaches the threshold, then stays quiet until the value has gone back past
/// `threshold ∓ hysteresis`, which re-arms it. Returns (fire, armed afterwards).
pub fn trigger_step(
    edge: Edge,
    threshold: f64,
    hysteresis: f64,
    armed: bool,
    value: f64,
) -> (bool, bool) {
    let h = hysteresis.max(0.0);
    match edge {
        Edge::High if armed && value >= threshold => (true, false),
        Edge::High if !armed && value < threshold - h => (false, true),
        Edge::Low if armed && value <= threshold => (true, false),
        Edge::Low if !armed && value > threshold + h => (false, true),
        _ => (false, armed),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    Avg,
    Min,
    Max,
    Sum,
    Count,
}

impl Op {
    pub fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "avg" => Op::Avg,
            "min" => Op::Min,
            "max" => Op::Max,
            "sum" => Op::Sum,
            "count" => Op::Count,
            _ => return None,
        })
    }
}

/// `op` over the usable inputs; `None` (null) when there are none.
pub fn compute(op: Op, values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    Some(match op {
        Op::Avg => values.iter().sum::<f64>() / values.len() as f64,
        Op::Min => values.iter().copied().fold(f64::INFINITY, f64::min),
        Op::Max => values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Op::Sum => values.iter().sum(),
        Op::Count => values.len() as f64,
    })
}

/// A number for automation: JSON numbers only (a string or bool is not a reading).
pub fn numeric(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

/// The node that caused an invocation, for webhook templates.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Invoker {
    pub id: String,
    pub name: String,
    pub value: Value,
    pub timestamp: u64,
}

/// Replaces `{value}`, `{name}`, `{id}` and `{timestamp}` with the invoker's. A value
/// is written as JSON (`21.5`, `true`, `null`, a string without quotes), so a body
/// like `{"t": {value}}` stays valid JSON for numbers.
pub fn render(template: &str, inv: &Invoker) -> String {
    let value = match &inv.value {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    template
        .replace("{value}", &value)
        .replace("{name}", &inv.name)
        .replace("{id}", &inv.id)
        .replace("{timestamp}", &inv.timestamp.to_string())
}

/// One outgoing webhook request, sent from a worker thread.
#[derive(Debug)]
pub struct WebhookCall {
    pub method: String,
    pub url: String,
    pub content_type: String,
    pub body: String,
}

impl WebhookCall {
    /// Sends it: 5 s for connecting and answering; https is checked against the
    /// system's roots. The HTTP status, or why there is none.
    pub fn send(&self) -> Result<u16, String> {
        static AGENT: std::sync::OnceLock<ureq::Agent> = std::sync::OnceLock::new();
        let agent = AGENT.get_or_init(|| {
            let t = std::time::Duration::from_secs(WEBHOOK_TIMEOUT_S);
            ureq::AgentBuilder::new()
                .timeout(t)
                .timeout_connect(t)
                .redirects(3)
                .user_agent(concat!("krill/", env!("CARGO_PKG_VERSION")))
                .build()
        });
        let req = agent
            .request(&self.method, &self.url)
            .set("Content-Type", &self.content_type);
        let r = if self.method == "GET" || self.method == "DELETE" {
            req.call()
        } else {
            req.send_string(&self.body)
        };
        match r {
            Ok(resp) => Ok(resp.status()),
            Err(ureq::Error::Status(s, _)) => Ok(s),
            Err(ureq::Error::Transport(t)) => Err(t.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(edge: Edge, th: f64, hy: f64, values: &[f64]) -> Vec<bool> {
        let mut armed = true;
        values
            .iter()
            .map(|&v| {
                let (fire, a) = trigger_step(edge, th, hy, armed, v);
                armed = a;
                fire
            })
            .collect()
    }

    #[test]
    fn high_threshold_fires_once_per_crossing() {
        let fired = run(
            Edge::High,
            25.0,
            0.0,
            &[20.0, 24.9, 25.0, 26.0, 30.0, 24.0, 26.0],
        );
        assert_eq!(fired, vec![false, false, true, false, false, false, true]);
    }

    #[test]
    fn hysteresis_stops_a_storm_at_the_threshold() {
        // A reading hovering around 25 fires once; it must fall below 23 to re-arm.
        let fired = run(
            Edge::High,
            25.0,
            2.0,
            &[24.9, 25.1, 24.9, 25.1, 24.0, 25.2, 22.9, 25.0],
        );
        assert_eq!(
            fired,
            vec![false, true, false, false, false, false, false, true]
        );
    }

    #[test]
    fn low_threshold_mirrors_high() {
        let fired = run(
            Edge::Low,
            10.0,
            1.0,
            &[15.0, 10.0, 9.0, 10.5, 9.0, 11.5, 10.0],
        );
        assert_eq!(fired, vec![false, true, false, false, false, false, true]);
    }

    #[test]
    fn a_new_trigger_past_its_threshold_fires_at_once() {
        assert_eq!(
            trigger_step(Edge::High, 25.0, 0.0, true, 40.0),
            (true, false)
        );
        assert_eq!(trigger_step(Edge::Low, 25.0, 0.0, true, 0.0), (true, false));
    }

    #[test]
    fn negative_hysteresis_counts_as_zero() {
        assert_eq!(
            trigger_step(Edge::High, 25.0, -5.0, false, 24.99),
            (false, true)
        );
    }

    #[test]
    fn compute_ops() {
        let v = [20.0, 22.0, 27.0];
        assert_eq!(compute(Op::Avg, &v), Some(23.0));
        assert_eq!(compute(Op::Min, &v), Some(20.0));
        assert_eq!(compute(Op::Max, &v), Some(27.0));
        assert_eq!(compute(Op::Sum, &v), Some(69.0));
        assert_eq!(compute(Op::Count, &v), Some(3.0));
        for op in [Op::Avg, Op::Min, Op::Max, Op::Sum, Op::Count] {
            assert_eq!(compute(op, &[]), None, "{op:?} of nothing is null");
        }
        assert_eq!(Op::parse("avg"), Some(Op::Avg));
        assert_eq!(Op::parse("median"), None);
    }

    #[test]
    fn only_numbers_are_readings() {
        assert_eq!(numeric(&json!(21.5)), Some(21.5));
        assert_eq!(numeric(&json!(3)), Some(3.0));
        for v in [json!("21"), json!(true), json!(null), json!([1])] {
            assert_eq!(numeric(&v), None, "{v}");
        }
    }

    #[test]
    fn templates() {
        let inv = Invoker {
            id: "avg1".into(),
            name: "Average".into(),
            value: json!(23.5),
            timestamp: 17,
        };
        assert_eq!(
            render(
                r#"{"avg":{value},"from":"{name}","id":"{id}","at":{timestamp}}"#,
                &inv
            ),
            r#"{"avg":23.5,"from":"Average","id":"avg1","at":17}"#
        );
        let s = Invoker {
            value: json!("on"),
            ..inv
        };
        assert_eq!(render("state={value}", &s), "state=on");
    }
}
