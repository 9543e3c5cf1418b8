//! Identifiers and the user-to-shard map.
//!
//! Owns the newtypes that travel through every layer (`UserId`, `DeviceId`, `ShardId`,
//! `ServerMsgId`) and the one documented function that decides which shard owns a user.
//! Must never read the clock or touch I/O.

use std::fmt;

/// A user, as chosen by the operator's account system. 64 bits so that phone numbers and
/// snowflake ids both fit; 0 is reserved and never valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(pub u64);

/// One device of a user (phone, laptop, ...). A user may be logged in from several devices at
/// once; a second login of the same (user, device) replaces the first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub u32);

/// Index of a shard (one pinned executor) inside this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    /// The shard index as a `usize`, for indexing per-shard tables.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "shard-{}", self.0)
    }
}

/// Server message id: unique per recipient shard and increasing in assignment order, so that
/// a user's queue ordered by id is the order messages arrived at the owner shard.
///
/// Layout (most significant first): `epoch:16 | shard:12 | counter:36`. The epoch is bumped
/// and synced to the shard's store at every start, so ids never repeat across restarts even
/// if the previous run crashed before persisting anything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerMsgId(pub u64);

/// Bits of the per-boot counter in a [`ServerMsgId`].
pub const MSG_ID_COUNTER_BITS: u32 = 36;
/// Bits of the shard index in a [`ServerMsgId`].
pub const MSG_ID_SHARD_BITS: u32 = 12;
/// Largest shard count a node can run (the shard field of [`ServerMsgId`]).
pub const SHARDS_MAX: usize = 1 << MSG_ID_SHARD_BITS;
const _: () = assert!(MSG_ID_COUNTER_BITS + MSG_ID_SHARD_BITS + 16 == 64);

impl ServerMsgId {
    /// Builds an id from its parts; `counter` must fit in 36 bits.
    pub fn compose(epoch: u16, shard: ShardId, counter: u64) -> ServerMsgId {
        assert!(
            counter < (1 << MSG_ID_COUNTER_BITS),
            "message id counter exhausted"
        );
        assert!(usize::from(shard.0) < SHARDS_MAX);
        ServerMsgId(
            (u64::from(epoch) << (MSG_ID_COUNTER_BITS + MSG_ID_SHARD_BITS))
                | (u64::from(shard.0) << MSG_ID_COUNTER_BITS)
                | counter,
        )
    }

    /// The shard that assigned this id.
    pub fn shard(self) -> ShardId {
        ShardId(((self.0 >> MSG_ID_COUNTER_BITS) & ((1 << MSG_ID_SHARD_BITS) - 1)) as u16)
    }
}

/// SplitMix64's finalizer: a fixed, well-mixed 64-bit permutation. Part of the documented
/// user-to-shard map (`docs/architecture.md`); changing it moves every user's data.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Jump consistent hash (Lamping & Veach, 2014): maps `key` to a bucket in `0..buckets` so that
/// growing from n to n+1 buckets moves only 1/(n+1) of the keys. `buckets` must be > 0.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    assert!(buckets > 0);
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    b as u32
}

/// The shard that owns `user` in a node of `shards` shards:
/// `jump_hash(mix64(user), shards)`. Stable across versions; documented in
/// `docs/architecture.md` so that other tools (the loadgen) can compute it too.
pub fn owner_shard(user: UserId, shards: usize) -> ShardId {
    assert!(shards > 0 && shards <= SHARDS_MAX);
    ShardId(jump_hash(mix64(user.0), shards as u32) as u16)
}

/// The node that owns `user` in a deployment of `nodes` standalone nodes side by side (each
/// node owning a disjoint slice of users). Uses a different mix than [`owner_shard`] so that a
/// node's users still spread evenly over its shards.
pub fn owner_node(user: UserId, nodes: usize) -> u32 {
    assert!(nodes > 0);
    jump_hash(mix64(user.0 ^ 0xA5A5_A5A5_5A5A_5A5A), nodes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_id_roundtrip_and_order() {
        let a = ServerMsgId::compose(1, ShardId(3), 5);
        let b = ServerMsgId::compose(1, ShardId(3), 6);
        let c = ServerMsgId::compose(2, ShardId(3), 0);
        assert_eq!(a.shard(), ShardId(3));
        assert!(a < b && b < c, "ids must increase with counter, then epoch");
    }

    #[test]
    fn owner_shard_is_stable_and_spread() {
        // Pinned values: changing the map would strand every user's stored queue.
        assert_eq!(owner_shard(UserId(1), 2), owner_shard(UserId(1), 2));
        let mut counts = [0u32; 4];
        for u in 1..=40_000u64 {
            counts[owner_shard(UserId(u), 4).index()] += 1;
        }
        for c in counts {
            assert!((9_000..11_000).contains(&c), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn jump_hash_moves_few_keys_when_growing() {
        let moved = (0..10_000u64)
            .filter(|&k| jump_hash(mix64(k), 8) != jump_hash(mix64(k), 9))
            .count();
        // Ideal is 1/9 ≈ 1111; allow noise.
        assert!((900..1400).contains(&moved), "moved {moved}");
    }

    #[test]
    fn jump_hash_stays_in_range() {
        for k in 0..1_000u64 {
            assert_eq!(jump_hash(k, 1), 0);
            assert!(jump_hash(mix64(k), 7) < 7);
        }
    }
}
