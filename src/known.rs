//! `known_peers.json` (PROTOCOL §7): the peers this server has been connected to,
//! dialled at start before any beacon. Pure functions; the store thread writes it.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::proto;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KnownPeer {
    pub install_id: String,
    pub address: IpAddr,
    pub port: u16,
    pub name: String,
    /// Epoch ms of the last time it was connected (or seen connected).
    pub last_seen: u64,
    pub success_count: u64,
    pub failure_count: u64,
}

/// Keyed by installId.
pub type Known = BTreeMap<String, KnownPeer>;

/// Drops entries not seen for `max_age_ms` (24 h by default).
pub fn prune(known: &mut Known, now_ms: u64, max_age_ms: u64) -> usize {
    let before = known.len();
    known.retain(|_, p| now_ms.saturating_sub(p.last_seen) <= max_age_ms);
    before - known.len()
}

pub fn encode(known: &Known) -> Vec<u8> {
    serde_json::to_vec_pretty(known).expect("known peers serialize")
}

/// Reads the file; a missing file is empty, an unreadable or broken one is logged
/// and treated as empty (it only speeds up start-up; beacons and static peers remain).
pub fn load(state_dir: &Path, now_ms: u64, max_age_ms: u64) -> Known {
    let p = state_dir.join(proto::KNOWN_PEERS_FILE);
    let data = match std::fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Known::new(),
        Err(e) => {
            log::warn!(
                "cannot read {}: {e}; starting without known peers",
                p.display()
            );
            return Known::new();
        }
    };
    match serde_json::from_slice::<Known>(&data) {
        Ok(mut k) => {
            k.retain(|id, p| *id == p.install_id && crate::util::is_uuid(id));
            prune(&mut k, now_ms, max_age_ms);
            k
        }
        Err(e) => {
            log::warn!(
                "{} is not valid ({e}); starting without known peers",
                p.display()
            );
            Known::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(id: &str, last_seen: u64) -> KnownPeer {
        KnownPeer {
            install_id: id.into(),
            address: "10.0.0.1".parse().unwrap(),
            port: 8442,
            name: "p".into(),
            last_seen,
            success_count: 1,
            failure_count: 0,
        }
    }

    #[test]
    fn prune_drops_old_entries() {
        let day = 24 * 3600 * 1000;
        let mut k = Known::new();
        k.insert("a".into(), peer("a", 10 * day));
        k.insert("b".into(), peer("b", 10 * day - day - 1));
        assert_eq!(prune(&mut k, 10 * day, day), 1);
        assert!(k.contains_key("a") && !k.contains_key("b"));
    }

    #[test]
    fn load_round_trip_and_bad_files() {
        let dir = std::env::temp_dir().join(format!("krill-known-{}", crate::util::uuid_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let id = "11111111-2222-4333-8444-555555555555";
        let mut k = Known::new();
        k.insert(id.into(), peer(id, 1000));
        k.insert("not-a-uuid".into(), peer("not-a-uuid", 1000));
        std::fs::write(dir.join("known_peers.json"), encode(&k)).unwrap();
        let back = load(&dir, 2000, 10_000);
        assert_eq!(back.len(), 1, "entries that are not UUIDs are dropped");
        assert_eq!(back[id], k[id]);
        assert!(load(&dir, 1000 + 20_000, 10_000).is_empty(), "too old");
        std::fs::write(dir.join("known_peers.json"), "{broken").unwrap();
        assert!(load(&dir, 2000, 10_000).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
