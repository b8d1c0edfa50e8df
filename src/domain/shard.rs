//! Assigning items to shards: `fnv1a64(key) % N`. FNV-1a is defined by its constants, not by a
//! library version or a process's random seed (unlike Rust's `DefaultHasher`), so a key lands in
//! the same shard on every machine, in every version, forever — which `ShardMeta` records.

/// The hash's name as `ShardMeta` stores it.
pub(crate) const HASH_NAME: &str = "fnv1a64";
/// The strategy's name as `ShardMeta` stores it.
pub(crate) const STRATEGY: &str = "hash_mod";

const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// 64-bit FNV-1a of the key's UTF-8 bytes.
pub fn fnv1a64(key: &str) -> u64 {
    key.bytes().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(PRIME)
    })
}

/// The shard (0-based) of `key` among `shards`.
pub fn shard_of(key: &str, shards: u32) -> u32 {
    assert!(shards > 0, "a job has at least one shard");
    (fnv1a64(key) % u64::from(shards)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_fnv1a_vectors() {
        assert_eq!(fnv1a64(""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64("a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64("foobar"), 0x85944171f73967e8);
    }

    /// Golden: these keys must land in these shards in every run, on every machine, in every
    /// future version. Changing this table breaks every sharded job in flight.
    #[test]
    fn shard_assignment_is_stable() {
        let golden = [
            ("item-0", 4, 3),
            ("item-1", 4, 0),
            ("item-2", 4, 1),
            ("item-3", 4, 2),
            ("https://example.com/a", 8, 7),
            ("https://example.com/b", 8, 2),
            ("user:42", 16, 2),
            ("", 3, 2),
        ];
        for (key, shards, expected) in golden {
            assert_eq!(shard_of(key, shards), expected, "{key} of {shards}");
        }
    }
}
