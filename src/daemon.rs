//! `krill run`: loads identity and credentials, starts the threads, and runs the
//! state owner on the main thread until SIGTERM/SIGINT. SIGHUP re-reads the config
//! file and the credential files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::beacon::{self, BeaconSender, Me};
use crate::config::{Config, Raw};
use crate::credentials::{self, Keys};
use crate::http::{self, AuthLimiter, HttpCtx};
use crate::peer::PeerCtx;
use crate::state::{Counters, Event, Parts, Reload, SharedKeys, State};
use crate::worker::Worker;
use crate::{known, logging, store, tls, util};

/// Queue depth of the state owner's channel: deep enough for bursts, bounded so a
/// flood slows its senders instead of growing memory. The slots are allocated up
/// front (about 60 KiB here; 8192 slots of an unboxed `Event` took 1.9 MiB, the
/// largest single item of an idle server's memory).
const EVENT_QUEUE: usize = 1024;

/// The SIGTERM promise: exit within 2 s even if something hangs.
const SHUTDOWN_DEADLINE: Duration = Duration::from_millis(1800);

/// How the daemon was started, kept for SIGHUP.
pub struct RunArgs {
    pub env: BTreeMap<String, String>,
    pub flags: Vec<(String, Raw, String)>,
    pub pin_stdin: bool,
}

/// Runs the daemon; returns the exit status.
pub fn run(cfg: Config, args: RunArgs) -> i32 {
    util::tune_malloc();
    logging::init(cfg.log_level);
    let _ = rustls::crypto::ring::default_provider().install_default();
    match start(cfg, args) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            1
        }
    }
}

fn load_keys(cfg: &Config, pin_stdin: bool) -> Result<Option<Keys>, String> {
    if pin_stdin {
        let secret = credentials::read_secret_stdin()?;
        credentials::validate_secret(&secret)?;
        log::warn!("development mode: cluster PIN read from stdin, kept in memory only");
        return Ok(Some(Keys::derive(
            &secret,
            &cfg.cluster,
            cfg.kdf_iterations,
        )));
    }
    credentials::load(&cfg.credentials_dir)
}

fn start(cfg: Config, args: RunArgs) -> Result<(), String> {
    let keys = match load_keys(&cfg, args.pin_stdin) {
        Ok(k) => k,
        Err(e) if args.pin_stdin => {
            eprintln!("krill: {e}");
            std::process::exit(2);
        }
        Err(e) => return Err(e),
    };
    if keys.is_none() {
        log::warn!(
            "no cluster PIN set in {}: serving /livez only; set one with 'sudo krill-reset-pin' (or 'krill set-pin'), then 'systemctl reload krill'",
            cfg.credentials_dir.display()
        );
    }
    let keys = Arc::new(RwLock::new(keys));
    util::ensure_dir(&cfg.state_dir, 0o750)
        .map_err(|e| format!("cannot create state_dir {}: {e}", cfg.state_dir.display()))?;
    let install_id = store::install_id(&cfg.state_dir)?;
    let identity = tls::load_or_create(&cfg.state_dir, &cfg.name)?;
    let own_nodes = store::load_nodes(&cfg.state_dir)?;
    let me = Me {
        install_id: install_id.clone(),
        session_id: util::uuid_v4(),
        host: util::hostname(),
        name: cfg.name.clone(),
        port: cfg.port,
    };
    let counters = Arc::new(Counters::default());
    let (tx, rx) = crossbeam_channel::bounded(EVENT_QUEUE);

    let beacon = if cfg.beacons {
        let sock = beacon::open_socket(cfg.beacon_port).map_err(|e| {
            format!(
                "cannot open beacon port {} (beacon_port): {e}",
                cfg.beacon_port
            )
        })?;
        let sender = BeaconSender::new(
            &sock,
            cfg.beacon_group,
            cfg.beacon_port,
            cfg.beacon_interface.clone(),
        )
        .map_err(|e| format!("cannot set up beacon sending: {e}"))?;
        beacon::spawn_receiver(
            sock,
            install_id.clone(),
            keys.clone(),
            counters.clone(),
            tx.clone(),
        )
        .map_err(|e| format!("cannot start the beacon thread: {e}"))?;
        Some(sender)
    } else {
        log::info!("beacons off: static and known peers only");
        None
    };

    let http_ctx = Arc::new(HttpCtx {
        install_id: install_id.clone(),
        identity,
        keys: keys.clone(),
        tx: tx.clone(),
        counters: counters.clone(),
        keepalive: cfg.timings.sse_keepalive,
        dial_timeout: cfg.timings.dial_timeout,
        state_dir: cfg.state_dir.clone(),
        limiter: Mutex::new(AuthLimiter::default()),
    });
    let addr = http::start(&cfg, http_ctx)?;

    let store_tx =
        store::spawn_writer().map_err(|e| format!("cannot start the store thread: {e}"))?;
    // Blocking outbound work (static-peer probes, automation's writes to other
    // servers) runs here; webhooks get a pool of their own, so a dead target only
    // fills its own queue.
    let worker =
        Worker::start("outbound", 2, 256).map_err(|e| format!("cannot start the worker: {e}"))?;
    let webhooks = Worker::start("webhook", 2, 64)
        .map_err(|e| format!("cannot start the webhook worker: {e}"))?;
    let known = known::load(
        &cfg.state_dir,
        util::now_ms(),
        cfg.timings.known_peers_max_age.as_millis() as u64,
    );
    spawn_signals(tx.clone(), cfg.clone(), args, keys.clone())?;
    let peer_ctx = PeerCtx {
        me_install_id: install_id.clone(),
        me_port: cfg.port,
        state_dir: cfg.state_dir.clone(),
        keys: keys.clone(),
        timings: cfg.timings.clone(),
        tx: tx.clone(),
        counters: counters.clone(),
    };
    log::info!(
        "krill {} started: {} ({}), session {}, https://{addr}",
        crate::proto::VERSION,
        me.name,
        util::short(&install_id),
        util::short(&me.session_id)
    );
    let state = State::new(Parts {
        me,
        cfg,
        keys,
        counters,
        peer_ctx,
        own_nodes,
        known,
        beacon,
        store: store_tx,
        worker,
        webhooks,
    });
    drop(tx);
    // The listener and the beacon run: tell systemd (Type=notify).
    crate::systemd::notify("READY=1");
    state.run(rx);
    log::info!("stopped");
    Ok(())
}

fn spawn_signals(
    tx: crossbeam_channel::Sender<Event>,
    cfg: Config,
    args: RunArgs,
    keys: SharedKeys,
) -> Result<(), String> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .map_err(|e| format!("cannot install signal handlers: {e}"))?;
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGHUP {
                    reload(&tx, &cfg, &args, &keys);
                    continue;
                }
                let (done_tx, done_rx) = crossbeam_channel::bounded(1);
                let _ = tx.send(Event::Shutdown(done_tx));
                // Whatever happens, the process is gone within 2 s.
                let _ = done_rx.recv_timeout(SHUTDOWN_DEADLINE);
                std::thread::sleep(Duration::from_millis(50));
                std::process::exit(0);
            }
        })
        .map_err(|e| format!("cannot start the signal thread: {e}"))?;
    Ok(())
}

fn reload(
    tx: &crossbeam_channel::Sender<Event>,
    running: &Config,
    args: &RunArgs,
    current: &SharedKeys,
) {
    log::info!(
        "SIGHUP: reading {} and the credentials again",
        running.file.display()
    );
    let cfg = match Config::load(&running.file, &args.env, &args.flags) {
        Ok(c) => c,
        Err(e) => {
            log::error!("reload failed, keeping the running settings: {e}");
            return;
        }
    };
    if cfg.cluster != running.cluster
        || cfg.kdf_iterations != running.kdf_iterations
        || cfg.port != running.port
    {
        log::warn!(
            "changes to keys other than log_level and the credentials take effect on restart"
        );
    }
    let keys = if args.pin_stdin {
        log::info!("PIN from stdin: credentials not re-read");
        current.read().clone()
    } else {
        match credentials::load(&cfg.credentials_dir) {
            Ok(k) => k,
            Err(e) => {
                log::error!("reload failed, keeping the running PIN: {e}");
                return;
            }
        }
    };
    let _ = tx.send(Event::Reload(Box::new(Reload {
        keys,
        log_level: cfg.log_level,
    })));
}
