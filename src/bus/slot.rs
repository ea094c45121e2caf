//! Redis Cluster hash slots: which of the 16,384 slots a key (or a shard channel) lives in.
//!
//! Needed on our side because everything sent in one script, one pipeline or one `SSUBSCRIBE`
//! must live in one slot: the bus groups by slot before it sends (see `DESIGN.md` §4,
//! "one slot per script").

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16_384;

/// The slot of `key`: CRC16 (XMODEM) of its hash tag — the part between the first `{` and
/// the next `}` when that part is not empty — or of the whole key, modulo 16,384.
pub fn of(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS
}

fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|b| *b == b'{')?;
    let len = key[open + 1..].iter().position(|b| *b == b'}')?;
    (len > 0).then(|| &key[open + 1..open + 1 + len])
}

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0, as the Redis Cluster spec uses.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for byte in bytes {
        crc ^= u16::from(*byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_the_redis_cluster_spec() {
        // The spec's check value, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(of(b"foo"), 12_182);
        assert_eq!(of(b"bar"), 5_061);
        assert_eq!(of(b"somekey"), 11_058);
    }

    #[test]
    fn a_hash_tag_decides_the_slot() {
        assert_eq!(of(b"{user1000}.following"), of(b"{user1000}.followers"));
        assert_eq!(of(b"pgfanout:{orders}:meta"), of(b"orders"));
        assert_eq!(
            of(b"pgfanout:{orders}:pub"),
            of(b"pgfanout:{orders}:history")
        );
        // An empty tag is no tag: the whole key counts; only the first `{` opens one.
        assert_eq!(of(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(of(b"foo{{bar}}zap"), of(b"{bar"));
    }
}
