//! The helper thread that computes the constraint masks of a step while the engine thread
//! runs the model: the constrained requests' matchers travel to it and back each step (boxed,
//! so a move costs a pointer), and the engine waits for them only after the forward pass.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use crate::constraint::Constraint;

/// A request's constraint on its way to the helper.
pub(super) type Job = (u64, Box<Constraint>);
/// ... and back, with the outcome of its mask.
pub(super) type Done = (u64, Box<Constraint>, Result<(), String>);

pub(super) struct Masker {
    jobs: Option<Sender<Vec<Job>>>,
    done: Receiver<Vec<Done>>,
    thread: Option<JoinHandle<()>>,
}

impl Masker {
    pub(super) fn start() -> std::io::Result<Self> {
        let (jobs, rx) = channel::<Vec<Job>>();
        let (tx, done) = channel();
        let thread = std::thread::Builder::new()
            .name("sglang-masks".into())
            .spawn(move || {
                for batch in rx {
                    let out: Vec<Done> = batch
                        .into_iter()
                        .map(|(id, mut c)| {
                            let r = c.compute_mask();
                            (id, c, r)
                        })
                        .collect();
                    if tx.send(out).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self {
            jobs: Some(jobs),
            done,
            thread: Some(thread),
        })
    }

    /// Hands a step's constraints to the helper; gives them back if it is gone.
    pub(super) fn submit(&self, batch: Vec<Job>) -> Result<(), Vec<Job>> {
        match &self.jobs {
            Some(jobs) => jobs.send(batch).map_err(|e| e.0),
            None => Err(batch),
        }
    }

    /// The constraints of the last `submit`, masks computed (None: the helper died).
    pub(super) fn collect(&self) -> Option<Vec<Done>> {
        self.done.recv().ok()
    }
}

impl Drop for Masker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
