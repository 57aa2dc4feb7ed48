//! One long-lived thread that starts the VMM.
//!
//! The VMM dies with the thread that spawned it (`PR_SET_PDEATHSIG`), which keeps a killed
//! shim from leaving VMs behind, and it inherits that thread's network namespace. ttrpc's
//! worker threads come and go, so VMs are started here.

use std::sync::mpsc;
use std::sync::Mutex;

type Job = Box<dyn FnOnce() + Send>;

#[derive(Debug)]
pub struct Launcher {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Launcher {
    pub fn new() -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("vm-launcher".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })?;
        Ok(Launcher {
            jobs: Mutex::new(tx),
        })
    }

    /// Runs `f` on the launcher thread and returns its result.
    pub fn run<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> Option<R> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs.lock().ok()?.send(job).ok()?;
        rx.recv().ok()
    }
}
