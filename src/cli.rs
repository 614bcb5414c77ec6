//! The command line: argument parsing, help, `set-pin`, and the client commands
//! (`status`, `peers`, `nodes`, `set`) that talk to the local daemon over HTTPS with
//! its own pinned certificate and the bearer from `pin_derived_key`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::config::{self, Config, Raw};
use crate::credentials::{self, Keys};
use crate::daemon::{self, RunArgs};
use crate::tls::{self, Verifier};
use crate::{proto, util};

const USAGE: &str = "krill: a self-organising mesh of small servers

Usage: krill <COMMAND> [OPTIONS]

Commands:
  run      run the daemon in the foreground (systemd runs this)
  set-pin  set the cluster PIN (asks twice, or --pin-stdin)
  status   summary of the local daemon; exit 1 if it is not running
  peers    the peer table
  nodes    the node table
  set      set a data point's value: krill set NODE_ID VALUE
  invoke   run an executor, webhook, compute or trigger now: krill invoke NODE_ID
  help     this text, or 'krill help COMMAND'

Options for every command:
  --config FILE   config file (default /etc/krill/krill.toml)
  -h, --help      help for the command
  -V, --version   print the version

Run 'krill COMMAND --help' for a command's options.
";

fn command_help(cmd: &str) -> Option<String> {
    let keys: String = config::KEYS
        .iter()
        .map(|(k, h)| format!("  --{:<22}{h}\n", k.replace('_', "-")))
        .collect();
    let common = "  --config FILE           config file (default /etc/krill/krill.toml)\n";
    Some(match cmd {
        "run" => format!(
            "Usage: krill run [OPTIONS]\n\nRuns the daemon in the foreground. Every config key is also a flag:\n{common}{keys}  --peer HOST:PORT        a static peer (repeatable)\n  --no-beacons            no multicast discovery (static and known peers only)\n  --pin-stdin             development only: read the PIN from stdin, write nothing\n\nEnvironment: KRILL_<KEY> (upper case) sets a default under the file and flags.\nSignals: SIGTERM/SIGINT stop (a 'leaving' beacon, exit 0 within 2 s); SIGHUP re-reads\nthe config file and the credentials.\n"
        ),
        "set-pin" => format!(
            "Usage: krill set-pin [--config FILE] [--pin-stdin] [--check]\n\nSets the cluster PIN: 4 digits, or a passphrase of 12 to 128 characters (far\nharder to guess; see the README). Asks twice on the terminal, or reads one line\nfrom stdin with --pin-stdin. Writes pin_derived_key and pin_hash (mode 0400) into\ncredentials_dir (mode 0700). Exit 2 on a bad PIN.\n  --check     verify a PIN against pin_hash instead (exit 0 match, 1 no match)\n{common}  --credentials-dir DIR, --cluster NAME, --kdf-iterations N as in 'krill run'\n"
        ),
        "status" => format!(
            "Usage: krill status [--config FILE]\n\nAsks the local daemon for /health and /network/stats and prints a summary.\nExit 1 when it is not running or refuses us.\n{common}"
        ),
        "peers" => format!(
            "Usage: krill peers [--config FILE] [--json]\n\nThe peer table: name, address, status, healthy, last seen.\n  --json      the raw JSON of /network/peers\n{common}"
        ),
        "nodes" => format!(
            "Usage: krill nodes [--config FILE] [--json]\n\nThe node table (own and mirrored).\n  --json      the raw JSON of /nodes\n{common}"
        ),
        "set" => format!(
            "Usage: krill set NODE_ID VALUE [--config FILE]\n\nSets a DataPoint's value on the local daemon (forwarded to the owner if\nanother server owns it). VALUE is read as JSON when it is a number, true,\nfalse, null or a quoted string, else as text.\n{common}"
        ),
        "invoke" => format!(
            "Usage: krill invoke NODE_ID [--config FILE]\n\nRuns an Executor.SetValue, OutgoingWebHook, Compute or Trigger node now (on\nwhichever server owns it). A DataPoint is set with 'krill set' instead.\n{common}"
        ),
        "help" => USAGE.to_string(),
        _ => return None,
    })
}

/// Parsed command line.
#[derive(Debug, Default)]
pub struct Args {
    pub command: String,
    pub config_file: Option<PathBuf>,
    pub flags: Vec<(String, Raw, String)>,
    pub positional: Vec<String>,
    pub pin_stdin: bool,
    pub json: bool,
    pub check: bool,
    pub help: bool,
    pub version: bool,
}

fn flag_key(flag: &str) -> Option<&'static str> {
    let k = flag.strip_prefix("--")?.replace('-', "_");
    config::KEYS.iter().map(|(k, _)| *k).find(|x| *x == k)
}

/// Parses `argv` (without the program name).
pub fn parse(argv: &[String]) -> Result<Args, String> {
    let mut a = Args::default();
    let mut peers: Vec<String> = Vec::new();
    let mut it = argv.iter().peekable();
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut value = |what: &str| -> Result<String, String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value ({what})")),
            }
        };
        match name.as_str() {
            "-h" | "--help" => a.help = true,
            "-V" | "--version" => a.version = true,
            "--config" => a.config_file = Some(PathBuf::from(value("a file")?)),
            "--pin-stdin" => a.pin_stdin = true,
            "--json" => a.json = true,
            "--check" => a.check = true,
            "--no-beacons" => {
                a.flags
                    .push(("beacons".into(), Raw::Text("false".into()), name.clone()))
            }
            "--peer" => peers.push(value("HOST:PORT")?),
            n if n.starts_with('-') && n.len() > 1 => {
                let key = flag_key(n).ok_or_else(|| format!("unknown option {n}"))?;
                let v = value("see --help")?;
                a.flags.push((key.to_string(), Raw::Text(v), name.clone()));
            }
            _ if a.command.is_empty() => a.command = arg.clone(),
            _ => a.positional.push(arg.clone()),
        }
    }
    if !peers.is_empty() {
        let list = peers.into_iter().map(toml::Value::String).collect();
        a.flags.push((
            "peers".into(),
            Raw::Toml(toml::Value::Array(list)),
            "--peer".into(),
        ));
    }
    Ok(a)
}

fn krill_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("KRILL_"))
        .collect()
}

/// Entry point; returns the exit status.
pub fn main(argv: Vec<String>) -> i32 {
    let args = match parse(argv.get(1..).unwrap_or_default()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("krill: {e}; see 'krill --help'");
            return 2;
        }
    };
    if args.version {
        println!("krill {}", proto::VERSION);
        return 0;
    }
    if args.command.is_empty() || args.command == "help" {
        let topic = args
            .positional
            .first()
            .map(String::as_str)
            .unwrap_or("help");
        match command_help(topic) {
            Some(h) => print!("{h}"),
            None => {
                eprintln!("krill: no command {topic:?}\n\n{USAGE}");
                return 2;
            }
        }
        return if args.command.is_empty() && !args.help {
            2
        } else {
            0
        };
    }
    let Some(help) = command_help(&args.command) else {
        eprintln!("krill: unknown command {:?}\n\n{USAGE}", args.command);
        return 2;
    };
    if args.help {
        print!("{help}");
        return 0;
    }
    let env = krill_env();
    let file = args
        .config_file
        .clone()
        .unwrap_or_else(|| PathBuf::from(config::DEFAULT_CONFIG_FILE));
    let cfg = match Config::load(&file, &env, &args.flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("krill: {e}");
            return 2;
        }
    };
    match args.command.as_str() {
        "run" => {
            if args.config_file.is_some() && !file.exists() {
                eprintln!(
                    "krill: note: config file {} does not exist; using defaults",
                    file.display()
                );
            }
            daemon::run(
                cfg,
                RunArgs {
                    env,
                    flags: args.flags,
                    pin_stdin: args.pin_stdin,
                },
            )
        }
        "set-pin" => set_pin(&cfg, &args),
        "status" => status(&cfg),
        "peers" => peers(&cfg, args.json),
        "nodes" => nodes(&cfg, args.json),
        "set" => set(&cfg, &args.positional),
        "invoke" => invoke(&cfg, &args.positional),
        _ => unreachable!("command_help knows every command"),
    }
}

fn set_pin(cfg: &Config, args: &Args) -> i32 {
    let secret = if args.pin_stdin {
        credentials::read_secret_stdin()
    } else {
        credentials::read_secret_tty("Cluster PIN (4 digits): ").and_then(|a| {
            if args.check {
                return Ok(a);
            }
            let b = credentials::read_secret_tty("Again: ")?;
            if a == b {
                Ok(a)
            } else {
                Err("the two entries differ; nothing changed".into())
            }
        })
    };
    let secret = match secret {
        Ok(s) => s,
        Err(e) => {
            eprintln!("krill: {e}");
            return 2;
        }
    };
    if let Err(e) = credentials::validate_secret(&secret) {
        eprintln!("krill: {e}; nothing changed");
        return 2;
    }
    if args.check {
        let p = cfg.credentials_dir.join(proto::PIN_HASH_FILE);
        let line = match std::fs::read_to_string(&p) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("krill: cannot read {}: {e}", p.display());
                return 2;
            }
        };
        return match credentials::verify_pin_hash(&secret, &line) {
            Ok(true) => {
                println!("the PIN matches");
                0
            }
            Ok(false) => {
                println!("the PIN does not match");
                1
            }
            Err(e) => {
                eprintln!("krill: {}: {e}", p.display());
                2
            }
        };
    }
    let keys = Keys::derive(&secret, &cfg.cluster, cfg.kdf_iterations);
    let hash = credentials::pin_hash(&secret, cfg.kdf_iterations);
    match credentials::store(&cfg.credentials_dir, &keys, &hash) {
        Ok(()) => {
            println!(
                "cluster PIN set in {}; a running daemon picks it up on SIGHUP ('systemctl reload krill')",
                cfg.credentials_dir.display()
            );
            0
        }
        Err(e) => {
            eprintln!("krill: {e}");
            1
        }
    }
}

/// A client for the local daemon.
struct Local {
    agent: ureq::Agent,
    base: String,
    bearer: String,
}

impl Local {
    fn new(cfg: &Config) -> Result<Local, String> {
        let cert = cfg.state_dir.join(proto::TLS_DIR).join(proto::CERT_FILE);
        let pem = std::fs::read_to_string(&cert)
            .map_err(|e| format!("cannot read the daemon's certificate {}: {e} (is krill installed, and are you root or in group krill?)", cert.display()))?;
        let der = tls::pem_to_der(&pem)
            .ok_or_else(|| format!("{} holds no certificate", cert.display()))?;
        let keys = credentials::load(&cfg.credentials_dir)?.ok_or_else(|| {
            format!(
                "no cluster PIN set in {}; run 'krill set-pin'",
                cfg.credentials_dir.display()
            )
        })?;
        let host = match cfg.bind {
            std::net::IpAddr::V4(a) if a.is_unspecified() => "127.0.0.1".to_string(),
            std::net::IpAddr::V6(a) if a.is_unspecified() => "[::1]".to_string(),
            std::net::IpAddr::V6(a) => format!("[{a}]"),
            a => a.to_string(),
        };
        let _ = rustls::crypto::ring::default_provider().install_default();
        Ok(Local {
            agent: tls::agent(
                Verifier::pinned(der),
                Duration::from_secs(2),
                Duration::from_secs(10),
            ),
            base: format!("https://{host}:{}", cfg.port),
            bearer: keys.bearer,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.bearer));
        let r = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match r {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => {
                return Err(format!(
                    "the krill daemon at {} is not answering: {t}",
                    self.base
                ));
            }
        };
        let status = resp.status();
        let text = resp
            .into_string()
            .map_err(|e| format!("reading the answer: {e}"))?;
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .map_err(|e| format!("the daemon's answer is not JSON: {e}"))?
        };
        if status == 401 {
            return Err(
                "the daemon refused our token: credentials_dir differs from the daemon's?".into(),
            );
        }
        Ok((status, v))
    }
}

fn with_local(cfg: &Config, f: impl FnOnce(&Local) -> Result<i32, String>) -> i32 {
    match Local::new(cfg).and_then(|l| f(&l)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("krill: {e}");
            1
        }
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// "3 s ago", "5 min ago", ... for an epoch-ms time.
fn ago(ms: &Value) -> String {
    let Some(t) = ms.as_u64() else {
        return "-".into();
    };
    let secs = util::now_ms().saturating_sub(t) / 1000;
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        _ => format!("{} h ago", secs / 3600),
    }
}

fn status(cfg: &Config) -> i32 {
    with_local(cfg, |l| {
        let (code, h) = l.call("GET", "/health", None)?;
        if code != 200 && code != 503 {
            return Err(format!("/health answered {code}: {}", s(&h["error"])));
        }
        let (_, st) = l.call("GET", "/network/stats", None)?;
        println!(
            "krill {} on {}: {}",
            s(&h["version"]),
            s(&h["name"]),
            s(&h["status"])
        );
        println!("  installId  {}", s(&h["installId"]));
        println!(
            "  session    {}   up {} s",
            s(&h["sessionId"]),
            s(&h["uptime"])
        );
        println!("  model      {} / {}", s(&h["model"]), s(&h["os"]));
        let comps = h["components"].as_object().map(|o| {
            o.iter()
                .map(|(k, v)| format!("{k} {}", s(v)))
                .collect::<Vec<_>>()
                .join(", ")
        });
        println!("  components {}", comps.unwrap_or_default());
        if let Some(a) = h["reachableAddress"].as_str() {
            println!("  reachable  {a} (as peers see this server)");
        }
        println!(
            "  peers      {} known, {} connected, {} healthy",
            s(&st["total_peers"]),
            s(&st["connected_peers"]),
            s(&st["healthy_peers"])
        );
        println!(
            "  beacons    {} sent, {} received, {} rejected",
            s(&st["beacons_sent"]),
            s(&st["beacons_received"]),
            s(&st["beacons_rejected"])
        );
        println!(
            "  data       {} B sent, {} B received",
            s(&st["data_sent"]),
            s(&st["data_received"])
        );
        Ok(0)
    })
}

fn peers(cfg: &Config, json: bool) -> i32 {
    with_local(cfg, |l| {
        let (_, v) = l.call("GET", "/network/peers", None)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            return Ok(0);
        }
        let rows: Vec<[String; 8]> = v["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                let healthy = if p["healthy"] == Value::Bool(true) {
                    "yes"
                } else {
                    "no"
                };
                [
                    s(&p["name"]),
                    format!("{}:{}", s(&p["address"]), s(&p["port"])),
                    s(&p["status"]),
                    healthy.to_string(),
                    s(&p["source"]),
                    ago(&p["lastSeen"]),
                    format!("{}/{}", s(&p["successCount"]), s(&p["failureCount"])),
                    util::short(&s(&p["installId"])).to_string(),
                ]
            })
            .collect();
        print_table(
            &[
                "NAME",
                "ADDRESS",
                "STATUS",
                "HEALTHY",
                "SOURCE",
                "LAST SEEN",
                "OK/FAIL",
                "ID",
            ],
            &rows,
        );
        Ok(0)
    })
}

fn nodes(cfg: &Config, json: bool) -> i32 {
    with_local(cfg, |l| {
        let (_, v) = l.call("GET", "/nodes", None)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            return Ok(0);
        }
        let rows: Vec<[String; 6]> = v["nodes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|n| {
                let value = describe(n);
                [
                    s(&n["id"]),
                    s(&n["name"]),
                    s(&n["type"]),
                    util::short(&s(&n["host"])).to_string(),
                    s(&n["state"]),
                    value,
                ]
            })
            .collect();
        print_table(
            &["ID", "NAME", "TYPE", "HOST", "STATE", "VALUE / WHAT"],
            &rows,
        );
        Ok(0)
    })
}

/// The VALUE column: a reading, or what an automation node does.
fn describe(n: &Value) -> String {
    let m = &n["meta"];
    let at = |r: &Value| {
        format!(
            "{}@{}",
            s(&r["id"]),
            util::short(r["host"].as_str().unwrap_or(""))
        )
    };
    let list = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(at).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    match n["type"].as_str().unwrap_or("") {
        "DataPoint" => {
            let unit = m["unit"]
                .as_str()
                .map(|u| format!(" {u}"))
                .unwrap_or_default();
            format!("{}{unit}", s(&m["value"]))
        }
        "Trigger.HighThreshold" | "Trigger.LowThreshold" => {
            let op = if n["type"] == "Trigger.HighThreshold" {
                ">="
            } else {
                "<="
            };
            format!(
                "{} {op} {} -> {}",
                at(&m["source"]),
                s(&m["threshold"]),
                list(&m["targets"])
            )
        }
        "Executor.SetValue" => format!("{} = {}", at(&m["target"]), s(&m["value"])),
        "Compute" => format!(
            "{} = {}({})",
            s(&m["value"]),
            s(&m["op"]),
            list(&m["inputs"])
        ),
        "OutgoingWebHook" => {
            let err = m["lastError"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default();
            format!("{} {}{err}", s(&m["method"]), s(&m["url"]))
        }
        _ => String::new(),
    }
}

/// Reads a command-line value as JSON when it is one (number, bool, null, "text").
pub fn parse_cli_value(s: &str) -> Value {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ (Value::Number(_) | Value::Bool(_) | Value::Null | Value::String(_))) => v,
        _ => Value::String(s.to_string()),
    }
}

fn set(cfg: &Config, pos: &[String]) -> i32 {
    let [id, value] = pos else {
        eprintln!("krill: usage: krill set NODE_ID VALUE");
        return 2;
    };
    let body = serde_json::json!({ "value": parse_cli_value(value) });
    with_local(cfg, |l| {
        let (code, v) = l.call("POST", &format!("/nodes/{id}/value"), Some(&body))?;
        match code {
            200 => {
                println!("{} = {}", s(&v["name"]), s(&v["meta"]["value"]));
                Ok(0)
            }
            409 if s(&v["error"]).contains("not a DataPoint") => Err(format!(
                "{}; run it with 'krill invoke {id}'",
                s(&v["error"])
            )),
            _ => Err(format!("{code}: {}", s(&v["error"]))),
        }
    })
}

fn invoke(cfg: &Config, pos: &[String]) -> i32 {
    let [id] = pos else {
        eprintln!("krill: usage: krill invoke NODE_ID");
        return 2;
    };
    with_local(cfg, |l| {
        let (code, v) = l.call("POST", &format!("/nodes/{id}/invoke"), None)?;
        match code {
            200 => {
                println!("invoked {} ({})", s(&v["name"]), s(&v["type"]));
                Ok(0)
            }
            _ => Err(format!("{code}: {}", s(&v["error"]))),
        }
    })
}

fn print_table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) {
    let mut w: Vec<usize> = head.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(head.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
    if rows.is_empty() {
        println!("(none)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn flags_map_to_keys() {
        let a = parse(&argv(
            "run --port 9000 --state-dir=/tmp/x --peer a:1 --peer b:2 --no-beacons --pin-stdin",
        ))
        .unwrap();
        assert_eq!(a.command, "run");
        assert!(a.pin_stdin);
        let keys: Vec<&str> = a.flags.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(keys, vec!["port", "state_dir", "beacons", "peers"]);
        let c = Config::load(
            std::path::Path::new("/nonexistent"),
            &BTreeMap::new(),
            &a.flags,
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.peers, vec!["a:1", "b:2"]);
        assert!(!c.beacons);
    }

    #[test]
    fn bad_flags_are_errors() {
        assert!(
            parse(&argv("run --bogus 1"))
                .unwrap_err()
                .contains("--bogus")
        );
        assert!(
            parse(&argv("run --port"))
                .unwrap_err()
                .contains("needs a value")
        );
    }

    #[test]
    fn cli_values() {
        assert_eq!(parse_cli_value("21.5"), serde_json::json!(21.5));
        assert_eq!(parse_cli_value("true"), serde_json::json!(true));
        assert_eq!(parse_cli_value("\"on\""), serde_json::json!("on"));
        assert_eq!(parse_cli_value("on"), serde_json::json!("on"));
        assert_eq!(parse_cli_value("[1]"), serde_json::json!("[1]"));
    }

    #[test]
    fn every_command_has_help() {
        for c in [
            "run", "set-pin", "status", "peers", "nodes", "set", "invoke", "help",
        ] {
            assert!(command_help(c).is_some(), "{c}");
        }
        assert!(command_help("run").unwrap().contains("--beacon-interface"));
    }
}
