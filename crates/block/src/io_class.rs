//! Background I/O: requests a job issues for its own progress (a backup's background copy),
//! which no guest waits for. Code marks them by running inside [`background`]; the mark
//! follows the task down the graph to the file driver, which keeps such requests out of the
//! guest's way: they queue behind guest requests in the thread-pool engine and do not count
//! in the file's cached-read hint (their cold reads would otherwise switch the guest's
//! cached-read path off).

use std::future::Future;

tokio::task_local! {
    static BACKGROUND: ();
}

/// Runs `f` with its requests marked as background I/O.
pub async fn background<F: Future>(f: F) -> F::Output {
    BACKGROUND.scope((), f).await
}

/// Whether the current task runs inside [`background`].
pub fn is_background() -> bool {
    BACKGROUND.try_with(|_| ()).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_mark_holds_inside_the_scope_only() {
        assert!(!is_background());
        assert!(background(async { is_background() }).await);
        assert!(!is_background());
    }
}
