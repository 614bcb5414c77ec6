//! A small pool of threads for blocking outbound work the state owner must never do
//! itself (probing static peers, later webhooks and forwarded writes). Its queue is
//! bounded: when it is full a job is refused, not buffered without end.

use crossbeam_channel::{Sender, TrySendError};

type Job = Box<dyn FnOnce() + Send>;

#[derive(Clone)]
pub struct Worker {
    tx: Sender<Job>,
    name: &'static str,
}

impl Worker {
    /// Starts `threads` threads sharing a queue of `queue` jobs.
    pub fn start(name: &'static str, threads: usize, queue: usize) -> std::io::Result<Worker> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue);
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .stack_size(crate::peer::PEER_STACK)
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })?;
        }
        Ok(Worker { tx, name })
    }

    /// Queues a job; `false` (logged) when the queue is full or the pool is gone.
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) -> bool {
        match self.tx.try_send(Box::new(job)) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                log::warn!("{} queue is full; a job was dropped", self.name);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn runs_jobs_and_refuses_past_the_queue() {
        let w = Worker::start("test", 1, 1).unwrap();
        let (block_tx, block_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        // Occupy the one thread, fill the one queue slot, then one more is refused.
        assert!(w.submit(move || {
            let _ = block_rx.recv();
        }));
        std::thread::sleep(Duration::from_millis(50));
        let d = done_tx.clone();
        assert!(w.submit(move || d.send(1).unwrap()));
        assert!(!w.submit(move || done_tx.send(2).unwrap()));
        block_tx.send(()).unwrap();
        assert_eq!(done_rx.recv_timeout(Duration::from_secs(2)), Ok(1));
        assert!(done_rx.recv_timeout(Duration::from_millis(100)).is_err());
    }
}
