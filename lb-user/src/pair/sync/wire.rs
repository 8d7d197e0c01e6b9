//! The pair link's protocol: frames on the TCP connection an agent opens to its peer.
//!
//! Every frame is a 4-byte big-endian length (of what follows), a kind byte and a body:
//!
//! | kind | body |
//! |---|---|
//! | [`HELLO`] | protocol [`VERSION`], the sender's role (0 active, 1 standby) |
//! | [`FLOWS`] | [`Record`]s back to back, [`RECORD_LEN`] bytes each |
//!
//! A record names everything by what both hosts share — addresses, the backend's IP, the
//! client NIC's name — never by a host's own indexes, and carries times as ages, since the
//! two hosts' monotonic clocks differ.

use anyhow::{bail, Context, Result};
use lb_common::FlowKey;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::HostRole;

/// Version of this protocol; a peer speaking another is refused.
pub const VERSION: u8 = 1;
/// Kind of a frame carrying the sender's role.
pub const HELLO: u8 = 1;
/// Kind of a frame carrying flows.
pub const FLOWS: u8 = 2;
/// Bytes of one encoded [`Record`].
pub const RECORD_LEN: usize = 60;
/// Records per [`FLOWS`] frame at most.
pub const BATCH: usize = 512;
/// The largest frame accepted (a full batch, with room to spare).
const MAX_FRAME: usize = 64 * 1024;

/// One flow as it crosses the pair link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// The flow's key, as the client sends.
    pub key: FlowKey,
    /// The address of the flow's backend.
    pub backend_ip: [u8; 4],
    /// The client's MAC (the router's, for routed clients).
    pub client_mac: [u8; 6],
    /// `lb_common::flow_state`.
    pub state: u8,
    /// `lb_common::flow_flags`.
    pub flags: u8,
    /// The name of the NIC the client's packets arrive on, NUL-padded.
    pub nic: [u8; 16],
    /// Nanoseconds since the flow's last packet, when it was sent.
    pub idle_ns: u64,
    /// Nanoseconds since the flow was created, when it was sent.
    pub age_ns: u64,
}

impl Record {
    /// The client NIC's name.
    pub fn nic_name(&self) -> String {
        let end = self
            .nic
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.nic.len());
        String::from_utf8_lossy(&self.nic[..end]).into_owned()
    }

    /// `name` as a record's NIC field (cut at 15 bytes, as the kernel's names are).
    pub fn nic_field(name: &str) -> [u8; 16] {
        let mut field = [0; 16];
        let bytes = name.as_bytes();
        let len = bytes.len().min(15);
        field[..len].copy_from_slice(&bytes[..len]);
        field
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let k = &self.key;
        out.extend_from_slice(&k.src);
        out.extend_from_slice(&k.dst);
        out.extend_from_slice(&k.src_port);
        out.extend_from_slice(&k.dst_port);
        out.push(k.proto);
        out.extend_from_slice(&self.backend_ip);
        out.extend_from_slice(&self.client_mac);
        out.push(self.state);
        out.push(self.flags);
        out.extend_from_slice(&self.nic);
        out.extend_from_slice(&self.idle_ns.to_be_bytes());
        out.extend_from_slice(&self.age_ns.to_be_bytes());
        out.extend_from_slice(&[0; 3]); // reserved
    }

    fn decode(b: &[u8; RECORD_LEN]) -> Record {
        let array = |at: usize| -> [u8; 4] { b[at..at + 4].try_into().expect("4 bytes") };
        let pair = |at: usize| -> [u8; 2] { b[at..at + 2].try_into().expect("2 bytes") };
        let long = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        Record {
            key: FlowKey::new(b[12], array(0), pair(8), array(4), pair(10)),
            backend_ip: array(13),
            client_mac: b[17..23].try_into().expect("6 bytes"),
            state: b[23],
            flags: b[24],
            nic: b[25..41].try_into().expect("16 bytes"),
            idle_ns: long(41),
            age_ns: long(49),
        }
    }
}

/// A frame received from the peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The peer's role now.
    Hello(HostRole),
    /// Flows the peer wrote.
    Flows(Vec<Record>),
}

/// Appends a [`HELLO`] frame carrying `role` to `out`.
pub fn encode_hello(role: HostRole, out: &mut Vec<u8>) {
    let role = match role {
        HostRole::Active => 0,
        HostRole::Standby => 1,
    };
    frame(HELLO, &[VERSION, role], out);
}

/// Appends [`FLOWS`] frames carrying `records` (at most [`BATCH`] each) to `out`.
pub fn encode_flows(records: &[Record], out: &mut Vec<u8>) {
    for batch in records.chunks(BATCH) {
        let mut body = Vec::with_capacity(batch.len() * RECORD_LEN);
        for record in batch {
            record.encode(&mut body);
        }
        frame(FLOWS, &body, out);
    }
}

fn frame(kind: u8, body: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(body.len() + 1).expect("frames are small");
    out.extend_from_slice(&len.to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
}

/// Reads the next frame from `reader`; `None` at a clean end of the stream. Frames of a
/// kind this version does not know are skipped.
pub async fn read<R: AsyncRead + Unpin>(reader: &mut R) -> Result<Option<Message>> {
    loop {
        let mut len = [0; 4];
        match reader.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e).context("cannot read from the peer"),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            bail!("the peer sent a frame of {len} bytes (at most {MAX_FRAME}): not lb's pair protocol");
        }
        let mut frame = vec![0; len];
        reader
            .read_exact(&mut frame)
            .await
            .context("the peer's connection ended within a frame")?;
        if let Some(message) = decode(frame[0], &frame[1..])? {
            return Ok(Some(message));
        }
    }
}

/// Decodes the body of a frame of `kind`; `None` for a kind this version does not know.
fn decode(kind: u8, body: &[u8]) -> Result<Option<Message>> {
    match kind {
        HELLO => {
            let [version, role, ..] = body else {
                bail!("the peer's hello is {} bytes long", body.len());
            };
            if *version != VERSION {
                bail!(
                    "the peer speaks version {version} of the pair protocol, this agent {VERSION}: \
                     run the same lb version on both hosts"
                );
            }
            let role = match role {
                0 => HostRole::Active,
                1 => HostRole::Standby,
                other => bail!("the peer's hello names an unknown role {other}"),
            };
            Ok(Some(Message::Hello(role)))
        }
        FLOWS => {
            if !body.len().is_multiple_of(RECORD_LEN) {
                bail!(
                    "the peer's flows frame is {} bytes, not a multiple of {RECORD_LEN}",
                    body.len()
                );
            }
            let records = body
                .chunks_exact(RECORD_LEN)
                .map(|chunk| Record::decode(chunk.try_into().expect("exact chunk")))
                .collect();
            Ok(Some(Message::Flows(records)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::proto;

    fn record(port: u16) -> Record {
        Record {
            key: FlowKey::new(
                proto::TCP,
                [198, 18, 1, 2],
                port.to_be_bytes(),
                [198, 18, 1, 100],
                [0, 80],
            ),
            backend_ip: [198, 18, 3, 2],
            client_mac: [2, 0, 0, 0, 1, 2],
            state: 2,
            flags: 1,
            nic: Record::nic_field("c0"),
            idle_ns: 1_500_000_000,
            age_ns: 90_000_000_000,
        }
    }

    #[tokio::test]
    async fn frames_read_back_as_written() {
        let records: Vec<Record> = (0..BATCH as u16 + 3).map(record).collect();
        let mut bytes = Vec::new();
        encode_hello(HostRole::Standby, &mut bytes);
        encode_flows(&records, &mut bytes);
        frame(99, b"from a later version", &mut bytes);
        encode_hello(HostRole::Active, &mut bytes);
        let mut reader = bytes.as_slice();
        assert_eq!(
            read(&mut reader).await.unwrap(),
            Some(Message::Hello(HostRole::Standby))
        );
        let Some(Message::Flows(first)) = read(&mut reader).await.unwrap() else {
            panic!("no flows frame");
        };
        let Some(Message::Flows(second)) = read(&mut reader).await.unwrap() else {
            panic!("no second flows frame");
        };
        assert_eq!((first.len(), second.len()), (BATCH, 3));
        assert_eq!([first, second].concat(), records);
        assert_eq!(
            read(&mut reader).await.unwrap(),
            Some(Message::Hello(HostRole::Active))
        );
        assert_eq!(read(&mut reader).await.unwrap(), None);
        assert_eq!(records[0].nic_name(), "c0");
    }

    #[tokio::test]
    async fn foreign_or_cut_input_is_refused() {
        let mut other_version = Vec::new();
        frame(HELLO, &[VERSION + 1, 0], &mut other_version);
        let error = read(&mut other_version.as_slice()).await.unwrap_err();
        assert!(
            format!("{error:#}").contains("same lb version"),
            "{error:#}"
        );

        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(read(&mut huge.as_slice()).await.is_err());

        let mut cut = Vec::new();
        encode_flows(&[record(1)], &mut cut);
        cut.truncate(cut.len() - 1);
        assert!(read(&mut cut.as_slice()).await.is_err());

        let mut ragged = Vec::new();
        frame(FLOWS, &[0; RECORD_LEN + 1], &mut ragged);
        assert!(read(&mut ragged.as_slice()).await.is_err());
    }
}
