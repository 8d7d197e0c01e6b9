//! The flow state machine, one step per packet, for both directions.
//!
//! TCP: `new` (the client's SYN, or a packet picked up mid-stream) → `replied` (the backend
//! answered) → `established` (the client acknowledged). A FIN from one side only marks it
//! (a half-closed connection may go on for long in the other direction); `closing` once
//! both sides sent a FIN, or on a RST. UDP and ICMP: `new` → `replied`.

use lb_common::{flow_flags, flow_state, proto, Flow};

use crate::parse::{tcp_flags, Ipv4};

/// Which end of the flow sent a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (forward path).
    Client,
    /// The backend (reverse path).
    Backend,
}

/// Applies `packet`, sent by `side`, to `flow`'s state and FIN marks; returns whether
/// either changed.
#[inline(always)]
pub fn advance(flow: &mut Flow, packet: &Ipv4, side: Side) -> bool {
    let (state, flags) = (flow.state, flow.flags);
    if packet.protocol != proto::TCP {
        if side == Side::Backend && flow.state == flow_state::NEW {
            flow.state = flow_state::REPLIED;
        }
        return flow.state != state;
    }
    let (own_fin, other_fin) = match side {
        Side::Client => (flow_flags::FIN_CLIENT, flow_flags::FIN_BACKEND),
        Side::Backend => (flow_flags::FIN_BACKEND, flow_flags::FIN_CLIENT),
    };
    if packet.tcp_flags & tcp_flags::RST != 0 {
        flow.state = flow_state::CLOSING;
    } else if packet.tcp_flags & tcp_flags::FIN != 0 {
        flow.flags |= own_fin;
        if flow.flags & other_fin != 0 {
            flow.state = flow_state::CLOSING;
        }
    } else if side == Side::Backend && flow.state == flow_state::NEW {
        flow.state = flow_state::REPLIED;
    } else if side == Side::Client
        && flow.state == flow_state::REPLIED
        && packet.tcp_flags & tcp_flags::SYN == 0
    {
        flow.state = flow_state::ESTABLISHED;
    }
    flow.state != state || flow.flags != flags
}
