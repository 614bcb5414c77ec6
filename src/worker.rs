//! A small pool of threads for blocking outbound work the state owner must never do
//! itself (probing static peers, automation's writes to other servers, webhooks).
//! Threads start on demand, up to a limit, and leave after a while without work, so
//! an idle server keeps none. Its queue is bounded: when it is full a job is
//! refused, not buffered without end.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

type Job = Box<dyn FnOnce() + Send>;

/// How long a worker thread waits for work before it leaves.
const IDLE_EXIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct Worker {
    tx: Sender<Job>,
    rx: Receiver<Job>,
    name: &'static str,
    max: usize,
    /// Threads alive, and those of them waiting for work.
    alive: Arc<AtomicUsize>,
    idle: Arc<AtomicUsize>,
}

impl Worker {
    /// A pool of at most `threads` threads sharing a queue of `queue` jobs.
    pub fn start(name: &'static str, threads: usize, queue: usize) -> std::io::Result<Worker> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue);
        Ok(Worker {
            tx,
            rx,
            name,
            max: threads.max(1),
            alive: Arc::new(AtomicUsize::new(0)),
            idle: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Queues a job; `false` (logged) when the queue is full or the pool is gone.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> bool {
        match self.tx.try_send(Box::new(job)) {
            Ok(()) => {
                if self.idle.load(Ordering::SeqCst) == 0
                    && self.alive.load(Ordering::SeqCst) < self.max
                {
                    self.spawn_thread();
                }
                true
            }
            Err(TrySendError::Full(_)) => {
                log::warn!("{} queue is full; a job was dropped", self.name);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    fn spawn_thread(&self) {
        let n = self.alive.fetch_add(1, Ordering::SeqCst);
        let (rx, alive, idle) = (self.rx.clone(), self.alive.clone(), self.idle.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{}-{n}", self.name))
            .stack_size(crate::peer::PEER_STACK)
            .spawn(move || {
                loop {
                    idle.fetch_add(1, Ordering::SeqCst);
                    let job = rx.recv_timeout(IDLE_EXIT);
                    idle.fetch_sub(1, Ordering::SeqCst);
                    match job {
                        Ok(job) => job(),
                        Err(RecvTimeoutError::Timeout) => {
                            // Leave first, then look: a job queued after this line sees
                            // one thread less and starts one; a job queued before it is
                            // still in the queue, and this thread stays for it.
                            alive.fetch_sub(1, Ordering::SeqCst);
                            if rx.is_empty() {
                                return;
                            }
                            alive.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            alive.fetch_sub(1, Ordering::SeqCst);
                            return;
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            self.alive.fetch_sub(1, Ordering::SeqCst);
            log::error!("cannot start a {} thread: {e}", self.name);
        }
    }

    /// Threads alive now (for tests and diagnostics).
    pub fn threads(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_threads_on_demand_and_refuses_past_the_queue() {
        let w = Worker::start("test", 1, 1).unwrap();
        assert_eq!(w.threads(), 0, "no thread before any work");
        let (block_tx, block_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        // Occupy the one thread, fill the one queue slot, then one more is refused.
        assert!(w.submit(move || {
            let _ = block_rx.recv();
        }));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(w.threads(), 1);
        let d = done_tx.clone();
        assert!(w.submit(move || d.send(1).unwrap()));
        assert!(!w.submit(move || done_tx.send(2).unwrap()));
        block_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(2)), Ok(1));
        assert!(done_rx.recv_timeout(Duration::from_millis(100)).is_err());
        assert_eq!(w.threads(), 1, "never more than the limit");
    }

    #[test]
    fn many_jobs_all_run() {
        let w = Worker::start("test", 3, 1000);
        let w = w.unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..500 {
            let tx = tx.clone();
            assert!(w.submit(move || tx.send(i).unwrap()));
        }
        let mut got: Vec<i32> = (0..500)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, (0..500).collect::<Vec<_>>());
        assert!(w.threads() <= 3);
    }
}
