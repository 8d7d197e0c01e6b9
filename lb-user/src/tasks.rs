//! The agent's long-running tasks besides the failover engine's (the census, the pair
//! link, the keepalived follower): each runs for as long as the agent, so one that ended
//! died. `/healthz` names them and the systemd watchdog goes unfed.

use std::sync::Mutex;

use tokio::task::JoinHandle;

/// Named tasks that must run for as long as the agent; aborted when dropped.
#[derive(Debug, Default)]
pub struct Background {
    tasks: Mutex<Vec<(&'static str, JoinHandle<()>)>>,
}

impl Background {
    /// Watches `task`, called `name` in the agent's health.
    pub fn add(&self, name: &'static str, task: JoinHandle<()>) {
        self.tasks.lock().expect("tasks lock").push((name, task));
    }

    /// The names of the tasks that ended.
    pub fn dead(&self) -> Vec<&'static str> {
        self.tasks
            .lock()
            .expect("tasks lock")
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(name, _)| *name)
            .collect()
    }

    /// Stops every task.
    pub fn abort_all(&self) {
        for (_, task) in self.tasks.lock().expect("tasks lock").iter() {
            task.abort();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::Background;

    /// A task that ends is named as dead, one that runs is not, and dropping the set stops
    /// the ones still running.
    #[tokio::test]
    async fn an_ended_task_is_named_dead() {
        let background = Background::default();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        background.add(
            "watcher",
            tokio::spawn(async {
                let _ = stopped.await;
            }),
        );
        let forever = tokio::spawn(std::future::pending::<()>());
        let forever_abort = forever.abort_handle();
        background.add("follower", forever);
        tokio::task::yield_now().await;
        assert!(background.dead().is_empty());
        stop.send(()).unwrap();
        for _ in 0..100 {
            if !background.dead().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(background.dead(), vec!["watcher"]);
        drop(background);
        for _ in 0..100 {
            if forever_abort.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            forever_abort.is_finished(),
            "a dropped set left its task running"
        );
    }
}
