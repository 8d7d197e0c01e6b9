//! A TCP server for the testbed's backends that holds its connections open: every line a
//! client sends on a connection is answered with the backend's name, so a client can tell,
//! message by message, which backend a long-lived connection is on.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::netns::Netns;

/// The TCP port the responders listen on.
pub const TCP_PORT: u16 = 7000;

/// A running responder; stopped (every connection closed) on drop.
pub struct TcpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpResponder {
    /// Starts a responder in namespace `ns` on [`TCP_PORT`], answering each line with
    /// `name` and a newline.
    pub fn start(ns: &Netns, name: &str) -> Result<Self> {
        let listener = ns.enter(|| -> Result<TcpListener> {
            let listener = TcpListener::bind(("0.0.0.0", TCP_PORT))?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let name = format!("{name}\n");
        let thread = std::thread::spawn(move || {
            let mut connections = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        // A connection's thread that ended is let go (its stack freed):
                        // health checks open a connection every millisecond.
                        connections.retain(|c: &JoinHandle<()>| !c.is_finished());
                        let (flag, name) = (flag.clone(), name.clone());
                        connections.push(std::thread::spawn(move || serve(stream, &flag, &name)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            for connection in connections {
                let _ = connection.join();
            }
        });
        Ok(TcpResponder {
            stop,
            thread: Some(thread),
        })
    }
}

/// Answers every line on `stream` with `name` until the peer closes or `stop` is set.
fn serve(stream: TcpStream, stop: &AtomicBool, name: &str) {
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .is_err()
    {
        return;
    }
    let Ok(mut writer) = stream.try_clone().context("clone") else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                line.clear();
                if writer.write_all(name.as_bytes()).is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for TcpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A client's connection to a responder, made from inside a namespace: each
/// [`ask`](Self::ask) sends a line and reads the name of the backend that answered.
pub struct LineClient {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LineClient {
    /// Connects from namespace `ns` to `to`; connecting, reading and writing each give up
    /// after `timeout`.
    pub fn open(ns: &Netns, to: SocketAddrV4, timeout: Duration) -> Result<Self> {
        let stream = ns.enter(move || -> Result<TcpStream> {
            let stream = TcpStream::connect_timeout(&to.into(), timeout)?;
            stream.set_read_timeout(Some(timeout))?;
            stream.set_write_timeout(Some(timeout))?;
            Ok(stream)
        })??;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(LineClient { stream, reader })
    }

    /// Sends a line; returns the name of the backend that answered it.
    pub fn ask(&mut self) -> Result<String> {
        self.stream.write_all(b"who\n")?;
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            bail!("connection closed by the far end");
        }
        Ok(line.trim().to_string())
    }
}
