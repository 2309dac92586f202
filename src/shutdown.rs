//! The shutdown signal handed to every task: the server flips it once, and each listener
//! and connection sees it and winds down on its own terms.

use tokio::sync::watch;

/// Sends the shutdown signal.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Receives the shutdown signal; cheap to clone into each task.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// A linked trigger and signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    /// True once shutdown has begun.
    pub fn is_shutdown(&self) -> bool {
        *self.0.borrow()
    }

    /// Completes when shutdown begins (at once if it already has, or if the trigger is gone).
    pub async fn recv(&mut self) {
        let _ = self.0.wait_for(|down| *down).await;
    }
}
