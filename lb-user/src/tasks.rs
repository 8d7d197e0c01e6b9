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
