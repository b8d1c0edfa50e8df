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
