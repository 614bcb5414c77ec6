//! Persistence: `install_id`, and own nodes in `nodes.json`, written by a thread of
//! its own with atomic replace (temp file, fsync, rename, fsync dir). Answers to the
//! changes a write covers are sent only once it is on disk, so every acknowledged
//! change survives a crash; changes that arrive during a write share the next one
//! (group commit).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::proto;
use crate::util;

/// Reads `<state_dir>/install_id`, making it on first start.
pub fn install_id(state_dir: &Path) -> Result<String, String> {
    let p = state_dir.join(proto::INSTALL_ID_FILE);
    match fs::read_to_string(&p) {
        Ok(s) if util::is_uuid(s.trim()) => Ok(s.trim().to_ascii_lowercase()),
        Ok(_) => Err(format!(
            "{} does not hold a UUID; remove it to make a new identity",
            p.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = util::uuid_v4();
            util::write_atomic(&p, format!("{id}\n").as_bytes(), 0o644)
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
            log::info!("new installation: installId {id}");
            Ok(id)
        }
        Err(e) => Err(format!("cannot read {}: {e}", p.display())),
    }
}

#[derive(Serialize, Deserialize)]
struct NodesFile {
    version: u32,
    nodes: Vec<Node>,
}

/// Own nodes from `nodes.json`. A file that cannot be parsed (edited by hand, disk
/// fault) is moved aside to `nodes.json.bad-<ms>`, never deleted, and start-up goes on.
pub fn load_nodes(state_dir: &Path) -> Result<Vec<Node>, String> {
    let p = state_dir.join(proto::NODES_FILE);
    let data = match fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
    };
    match serde_json::from_slice::<NodesFile>(&data) {
        Ok(f) => Ok(f.nodes),
        Err(e) => {
            let aside = p.with_extension(format!("json.bad-{}", util::now_ms()));
            fs::rename(&p, &aside).map_err(|e2| {
                format!("{} is corrupt ({e}) and cannot be moved: {e2}", p.display())
            })?;
            log::error!(
                "{} is corrupt ({e}); moved it to {} and started without own nodes",
                p.display(),
                aside.display()
            );
            Ok(Vec::new())
        }
    }
}

pub fn encode_nodes<'a>(nodes: impl Iterator<Item = &'a Node>) -> Vec<u8> {
    #[derive(Serialize)]
    struct Out<'a> {
        version: u32,
        nodes: Vec<&'a Node>,
    }
    serde_json::to_vec(&Out {
        version: 1,
        nodes: nodes.collect(),
    })
    .expect("nodes serialize")
}

/// Called once a write is durable (`Ok`) or failed (the error text).
pub type Done = Box<dyn FnOnce(Result<(), String>) + Send>;

/// One write: a whole file atomically (`None`: write nothing, just report when
/// every earlier job is done), then what to do once it is durable.
pub struct Job {
    pub write: Option<(PathBuf, Vec<u8>)>,
    pub done: Vec<Done>,
}

/// Starts the writer thread.
pub fn spawn_writer() -> io::Result<Sender<Job>> {
    let (tx, rx) = crossbeam_channel::unbounded::<Job>();
    std::thread::Builder::new()
        .name("store".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            for job in rx {
                let r = match &job.write {
                    Some((path, data)) => util::write_atomic(path, data, 0o640)
                        .map_err(|e| format!("cannot write {}: {e}", path.display())),
                    None => Ok(()),
                };
                if let Err(e) = &r {
                    log::error!("{e}");
                }
                for d in job.done {
                    d(r.clone());
                }
            }
        })?;
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("krill-store-{}", util::uuid_v4()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn install_id_is_made_once() {
        let d = tmp();
        let a = install_id(&d).unwrap();
        assert!(util::is_uuid(&a));
        assert_eq!(install_id(&d).unwrap(), a);
        fs::write(d.join("install_id"), "garbage").unwrap();
        assert!(install_id(&d).unwrap_err().contains("install_id"));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn nodes_round_trip_and_corrupt_file_is_kept_aside() {
        let d = tmp();
        assert!(load_nodes(&d).unwrap().is_empty());
        let n = Node {
            id: "a".into(),
            host: "h".into(),
            parent: None,
            kind: "DataPoint".into(),
            name: "n".into(),
            state: "NONE".into(),
            meta: serde_json::json!({"value": 3}),
            timestamp: 1,
            version: 2,
            hops: 0,
        };
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let w = spawn_writer().unwrap();
        w.send(Job {
            write: Some((d.join("nodes.json"), encode_nodes([&n].into_iter()))),
            done: vec![Box::new(move |r| done_tx.send(r).unwrap())],
        })
        .unwrap();
        assert_eq!(done_rx.recv().unwrap(), Ok(()));
        assert_eq!(load_nodes(&d).unwrap(), vec![n]);
        fs::write(d.join("nodes.json"), "{\"version\":1,\"nodes\":[{").unwrap();
        assert!(load_nodes(&d).unwrap().is_empty());
        let aside: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("nodes.json.bad-")
            })
            .collect();
        assert_eq!(aside.len(), 1, "corrupt file moved aside, not deleted");
        fs::remove_dir_all(&d).unwrap();
    }
}
