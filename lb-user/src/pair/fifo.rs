//! keepalived's notify FIFO (`vrrp_notify_fifo` in `global_defs`): keepalived writes one line
//! per state change, `INSTANCE "name" STATE priority` (or `GROUP …`), in order, to a FIFO
//! the agent reads. Unlike a notify script, no process is started per change, and two
//! changes cannot reach the agent in the other order.

use std::{os::unix::fs::FileTypeExt, path::Path};

use anyhow::{bail, Context, Result};
use tokio::io::AsyncBufReadExt;

use crate::config::HostRole;

/// The role a FIFO line asks for, with the line for the log; `None` for lines about
/// anything but a VRRP instance or sync group, and for `DELETED`.
pub fn parse(line: &str) -> Result<Option<(HostRole, String)>> {
    let mut words = line.split_whitespace();
    let (Some(kind), Some(name), Some(state)) = (words.next(), words.next(), words.next()) else {
        return Ok(None);
    };
    if kind != "INSTANCE" && kind != "GROUP" {
        return Ok(None);
    }
    let why = format!("keepalived {kind} {} {state}", name.trim_matches('"'));
    Ok(super::keepalived::role_for(state)?.map(|role| (role, why)))
}

/// Makes the FIFO at `path` if there is none (mode 0600: only root writes to it).
pub fn ensure(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_fifo() => Ok(()),
        Ok(_) => bail!(
            "{} exists and is not a FIFO: remove it or name another pair.keepalived_fifo",
            path.display()
        ),
        Err(_) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            nix::unistd::mkfifo(
                path,
                nix::sys::stat::Mode::S_IRUSR | nix::sys::stat::Mode::S_IWUSR,
            )
            .with_context(|| format!("cannot make the FIFO {}", path.display()))
        }
    }
}

/// Reads the FIFO at `path` for ever and calls `apply` with each role it asks for, in
/// order. Opened for reading and writing, it never sees an end of file when keepalived
/// restarts. A line that is not understood is logged and skipped (a name that is not UTF-8
/// is read with replacement characters): a stray write to the FIFO does not stop the
/// following.
pub async fn follow(path: &Path, mut apply: impl FnMut(HostRole, &str)) -> Result<()> {
    ensure(path)?;
    let receiver = tokio::net::unix::pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(path)
        .with_context(|| format!("cannot open the keepalived FIFO {}", path.display()))?;
    let mut lines = tokio::io::BufReader::new(receiver).split(b'\n');
    while let Some(bytes) = lines
        .next_segment()
        .await
        .with_context(|| format!("cannot read the keepalived FIFO {}", path.display()))?
    {
        // keepalived writes names as its config has them, in any encoding; only the state
        // word matters, so a name that is not UTF-8 is read with replacement characters.
        let line = String::from_utf8_lossy(&bytes);
        match parse(&line) {
            Ok(Some((role, why))) => apply(role, &why),
            Ok(None) => {}
            Err(e) => tracing::warn!("keepalived FIFO: {e:#} in {line:?}"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_lines_map_to_roles() {
        let (role, why) = parse("INSTANCE \"LB\" MASTER 150").unwrap().unwrap();
        assert_eq!(role, HostRole::Active);
        assert_eq!(why, "keepalived INSTANCE LB MASTER");
        let (role, _) = parse("GROUP \"G\" BACKUP").unwrap().unwrap();
        assert_eq!(role, HostRole::Standby);
        assert!(parse("RS 198.18.2.2:80 UP").unwrap().is_none());
        assert!(parse("INSTANCE \"LB\" DELETED 0").unwrap().is_none());
        assert!(parse("").unwrap().is_none());
        assert!(parse("INSTANCE \"LB\" SIDEWAYS 1").is_err());
    }

    /// A real FIFO: lines that are not understood, one of them not even text, are skipped;
    /// a state change of an instance whose name is not UTF-8 applies; the lines after
    /// them still apply, in order.
    #[tokio::test]
    async fn garbage_in_the_fifo_does_not_stop_the_following() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.fifo");
        let (roles, mut applied) = tokio::sync::mpsc::unbounded_channel();
        let follower = {
            let path = path.clone();
            tokio::spawn(async move {
                follow(&path, |role, _| {
                    let _ = roles.send(role);
                })
                .await
            })
        };
        for _ in 0..1000 {
            if path.exists() || follower.is_finished() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(path.exists(), "the follower made no FIFO");
        // Read and write: opening a FIFO so does not wait for its reader.
        let mut writer = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        use std::io::Write as _;
        writer
            .write_all(b"INSTANCE \"LB\" \xff\xfe 1\nINSTANCE \"LB\" SIDEWAYS 1\n")
            .unwrap();
        writer
            .write_all(b"INSTANCE \"L\xe9B\" BACKUP 100\nINSTANCE \"LB\" MASTER 150\n")
            .unwrap();
        let wait = std::time::Duration::from_secs(5);
        let first = tokio::time::timeout(wait, applied.recv()).await.unwrap();
        let second = tokio::time::timeout(wait, applied.recv()).await.unwrap();
        assert_eq!(first, Some(HostRole::Standby));
        assert_eq!(second, Some(HostRole::Active));
        assert!(!follower.is_finished(), "the follower stopped");
        follower.abort();
    }
}
