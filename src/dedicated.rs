//! Tasks on a thread of their own, for the few whose every step must not wait behind the main
//! runtime's queue (see `crate::admission` for why that queue can be long).

/// Runs `task` on a thread of its own, with a single-threaded runtime of its own, and returns a
/// handle that completes when the task does, and the runtime's handle: tasks spawned on it run
/// on that thread too, until `task` ends.
///
/// For the few tasks whose every step must not wait behind the node's connection churn: a task
/// of the main runtime that is woken waits for every task woken before it, and in a reconnect
/// storm that is thousands of sockets' handshakes, joins and cleanups. The SQLite group writer
/// is one: each of its transaction's statements is a round trip to the connection's thread, and
/// queued behind a storm six round trips held every send's acknowledgement for over 100 ms.
pub fn spawn<F>(
    name: &str,
    task: F,
) -> std::io::Result<(tokio::task::JoinHandle<()>, tokio::runtime::Handle)>
where
    F: Future<Output = ()> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = runtime.handle().clone();
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            runtime.block_on(task);
            let _ = done.send(());
        })?;
    let finished = tokio::spawn(async move {
        let _ = finished.await;
    });
    Ok((finished, handle))
}
