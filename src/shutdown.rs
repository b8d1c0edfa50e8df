//! The shutdown signal shared by `serve` and `worker`: SIGTERM or SIGINT (Ctrl-C).

use std::future::Future;

/// Resolves on the first SIGTERM or SIGINT. The handlers are installed when this is called, not
/// when the future is first polled: a signal that arrives as soon as the process answers (a
/// `kill -TERM` right after `/health` says 200) stops it gracefully instead of killing it.
/// Call it inside the runtime.
pub fn signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            let wait = |installed: std::io::Result<tokio::signal::unix::Signal>, name| async move {
                match installed {
                    Ok(mut signal) => {
                        signal.recv().await;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for {name}");
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                () = wait(interrupt, "SIGINT") => tracing::info!(signal = "SIGINT", "shutting down"),
                () = wait(terminate, "SIGTERM") => tracing::info!(signal = "SIGTERM", "shutting down"),
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
        tracing::info!(signal = "SIGINT", "shutting down");
    }
}

/// One switch that stops a process's background loops together (the outbox, the scheduler, the
/// queue-depth watch): each waits on [`Trigger::pulled`], the command pulls it once.
#[derive(Clone)]
pub(crate) struct Trigger(tokio::sync::watch::Sender<bool>);

impl Default for Trigger {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(false).0)
    }
}

impl Trigger {
    /// Resolves once the trigger is pulled (at once if it was), or dropped.
    pub(crate) fn pulled(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut pulled = self.0.subscribe();
        async move {
            let _ = pulled.wait_for(|pulled| *pulled).await;
        }
    }

    pub(crate) fn pull(&self) {
        self.0.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::Trigger;

    #[tokio::test]
    async fn every_waiter_wakes_when_the_trigger_is_pulled_and_a_late_one_at_once() {
        let trigger = Trigger::default();
        let early = tokio::spawn(trigger.pulled());
        tokio::task::yield_now().await;
        assert!(!early.is_finished());
        trigger.pull();
        early.await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), trigger.pulled())
            .await
            .expect("a waiter after the pull wakes at once");
    }
}
