//! krill: a small daemon that turns a handful of servers on one network into a
//! self-organising mesh. See `docs/protocol.md` and the README.

pub mod automation;
pub mod beacon;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod daemon;
pub mod http;
pub mod known;
pub mod logging;
pub mod node;
pub mod peer;
pub mod proto;
pub mod sse;
pub mod state;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod util;
pub mod worker;
