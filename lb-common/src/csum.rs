//! Internet checksum arithmetic (RFC 1071, incremental update per RFC 1624).
//!
//! Pure functions on plain values so that the XDP program and the host tests use the very same
//! code; the host tests check it against an independent implementation.

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Adds the two 16-bit words of a 4-byte field (network order) to `sum`.
#[inline(always)]
const fn add4(sum: u32, bytes: [u8; 4]) -> u32 {
    sum + u16::from_be_bytes([bytes[0], bytes[1]]) as u32
        + u16::from_be_bytes([bytes[2], bytes[3]]) as u32
}

/// Updates checksum `check` (as read from the wire, big-endian value) after a 4-byte field
/// covered by it changed from `old` to `new`: `HC' = ~(~HC + ~m + m')` (RFC 1624, eqn. 3).
#[inline(always)]
pub const fn replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let old_not = [!old[0], !old[1], !old[2], !old[3]];
    let sum = add4(add4(!check as u32, old_not), new);
    !fold(sum)
}

/// Updates checksum `check` after a 2-byte field covered by it changed from `old` to `new`
/// (RFC 1624, eqn. 3).
#[inline(always)]
pub const fn replace2(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    let sum = !check as u32 + !u16::from_be_bytes(old) as u32 + u16::from_be_bytes(new) as u32;
    !fold(sum)
}

/// Checksum of a 20-byte IPv4 header whose checksum field (bytes 10–11) is taken as zero.
#[inline(always)]
pub const fn ipv4_header(header: &[u8; 20]) -> u16 {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        if i != 10 {
            sum += u16::from_be_bytes([header[i], header[i + 1]]) as u32;
        }
        i += 2;
    }
    !fold(sum)
}

/// Whether a 20-byte IPv4 header carries a correct checksum: the one's-complement sum of
/// all ten words, checksum included, is `0xffff` (so `0x0000` and `0xffff` both pass where
/// they are equivalent).
#[inline(always)]
pub const fn ipv4_header_ok(header: &[u8; 20]) -> bool {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([header[i], header[i + 1]]) as u32;
        i += 2;
    }
    fold(sum) == 0xffff
}

/// Updates a UDP checksum after an address change; a zero checksum ("none") stays zero and a
/// computed zero is sent as `0xffff` (RFC 768).
#[inline(always)]
pub const fn udp_replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    if check == 0 {
        return 0;
    }
    match replace4(check, old, new) {
        0 => 0xffff,
        c => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward RFC 1071 sum over a byte slice, written independently of the above.
    fn reference(bytes: &[u8]) -> u16 {
        let mut sum: u64 = 0;
        for chunk in bytes.chunks(2) {
            let hi = chunk[0] as u64;
            let lo = *chunk.get(1).unwrap_or(&0) as u64;
            sum += (hi << 8) | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    const HEADER: [u8; 20] = [
        0x45, 0x00, 0x00, 0x54, 0x12, 0x34, 0x40, 0x00, 0x40, 0x06, 0x00, 0x00, 198, 18, 1, 2, 198,
        18, 1, 100,
    ];

    #[test]
    fn ipv4_header_matches_reference() {
        let mut h = HEADER;
        let c = ipv4_header(&h);
        assert_eq!(c, reference(&h));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        assert!(ipv4_header_ok(&h));
        assert_eq!(reference(&h), 0);
        h[8] -= 1;
        assert!(!ipv4_header_ok(&h));
    }

    #[test]
    fn incremental_update_equals_recomputation() {
        let mut h = HEADER;
        let c = ipv4_header(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        for new in [
            [198, 18, 2, 2],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [198, 19, 255, 1],
        ] {
            let old = [h[16], h[17], h[18], h[19]];
            let updated = replace4(u16::from_be_bytes([h[10], h[11]]), old, new);
            h[16..20].copy_from_slice(&new);
            let full = ipv4_header(&h);
            // 0x0000 and 0xffff are the same one's-complement value.
            assert!(
                updated == full || (updated ^ full) == 0xffff,
                "{updated:#x} {full:#x}"
            );
            h[10..12].copy_from_slice(&full.to_be_bytes());
        }
    }

    #[test]
    fn two_byte_update_equals_recomputation() {
        let mut h = HEADER;
        let c = ipv4_header(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        for new in [[0, 0], [0xff, 0xff], [0x12, 0x34]] {
            let old = [h[4], h[5]];
            let updated = replace2(u16::from_be_bytes([h[10], h[11]]), old, new);
            h[4..6].copy_from_slice(&new);
            let full = ipv4_header(&h);
            assert!(
                updated == full || (updated ^ full) == 0xffff,
                "{updated:#x} {full:#x}"
            );
            h[10..12].copy_from_slice(&full.to_be_bytes());
        }
    }

    #[test]
    fn a_checksum_of_ffff_is_as_good_as_zero() {
        // A header whose words sum to 0xffff without the checksum: correct checksum 0x0000,
        // and 0xffff is the same value in one's complement.
        let mut h = [0u8; 20];
        h[0] = 0xff;
        h[1] = 0xff;
        assert_eq!(ipv4_header(&h), 0);
        assert!(ipv4_header_ok(&h));
        h[10] = 0xff;
        h[11] = 0xff;
        assert!(ipv4_header_ok(&h));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        assert_eq!(udp_replace4(0, [1, 2, 3, 4], [5, 6, 7, 8]), 0);
        assert_ne!(udp_replace4(0x1234, [1, 2, 3, 4], [5, 6, 7, 8]), 0);
    }
}
