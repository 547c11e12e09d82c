//! Redis Cluster slots: which slot a key or subject hashes to, and which
//! master owns each slot (read with `CLUSTER SLOTS` and `CLUSTER NODES`).
//!
//! Apart from the connection code because it is pure computation on text
//! and replies, pinned by its own tests, and the connection only asks it
//! "where does this key go?".

use redis::Value;

/// The Redis Cluster slot of a subject whose keys carry the hash tag
/// `{tag}` (CRC16/XMODEM of the tag, modulo 16384), as Redis computes it.
pub fn slot_of(tag: &str) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag.as_bytes()) % 16384
}

/// One range of slots and the address (`host:port`) of its master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotRange {
    pub(crate) first: u16,
    pub(crate) last: u16,
    pub(crate) master: String,
}

/// The Cluster slot of a key, with Redis' hash-tag rule: the part between
/// the first `{` and the next `}`, if not empty, else the whole key.
pub(crate) fn key_slot(key: &str) -> u16 {
    let tagged = key.find('{').and_then(|open| {
        let rest = &key[open + 1..];
        rest.find('}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    slot_of(tagged.unwrap_or(key))
}

/// Which master owns each slot, as last read with `CLUSTER SLOTS`.
#[derive(Default)]
pub(super) struct SlotTable {
    /// Index into `masters` per slot; empty until the table is first read.
    owner: Vec<u16>,
    pub(super) masters: Vec<String>,
}

impl SlotTable {
    pub(super) fn from_ranges(ranges: &[SlotRange]) -> SlotTable {
        let mut t = SlotTable {
            owner: vec![u16::MAX; 16384],
            masters: Vec::new(),
        };
        for r in ranges {
            let i = match t.masters.iter().position(|m| *m == r.master) {
                Some(i) => i,
                None => {
                    t.masters.push(r.master.clone());
                    t.masters.len() - 1
                }
            } as u16;
            for slot in r.first..=r.last.min(16383) {
                t.owner[usize::from(slot)] = i;
            }
        }
        t
    }

    pub(super) fn master_of(&self, slot: u16) -> Option<&str> {
        let i = *self.owner.get(usize::from(slot))?;
        self.masters.get(usize::from(i)).map(String::as_str)
    }
}

/// Masters that are up, from `CLUSTER NODES` text.
pub(super) fn parse_cluster_masters(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let _id = parts.next()?;
            let addr = parts.next()?;
            let flags = parts.next()?;
            if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                return None;
            }
            let hostport = addr.split('@').next()?;
            let (host, port) = hostport.rsplit_once(':')?;
            Some((host.to_string(), port.parse().ok()?))
        })
        .collect()
}

/// Slot ranges and their masters from a `CLUSTER SLOTS` reply.
pub(super) fn parse_cluster_slots(v: &Value) -> Option<Vec<SlotRange>> {
    let Value::Array(ranges) = v else { return None };
    let int = |v: &Value| match v {
        Value::Int(i) => u16::try_from(*i).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    ranges
        .iter()
        .map(|r| {
            let Value::Array(f) = r else { return None };
            let Value::Array(master) = f.get(2)? else {
                return None;
            };
            let host = text(master.first()?)?;
            let port = match master.get(1)? {
                Value::Int(p) => *p,
                _ => return None,
            };
            Some(SlotRange {
                first: int(f.first()?)?,
                last: int(f.get(1)?)?,
                master: format!("{host}:{port}"),
            })
        })
        .collect()
}

/// True while a master marked failed still owns slots (failover pending).
pub(super) fn slots_on_failed_master(text: &str) -> bool {
    text.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 8 && f[2].contains("master") && f[2].contains("fail")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_master_with_slots_is_noticed() {
        assert!(slots_on_failed_master(
            "b 127.0.0.1:7001@17001 master,fail - 0 0 2 connected 5461-10922\n"
        ));
        assert!(!slots_on_failed_master(
            "b 127.0.0.1:7001@17001 master,fail - 0 0 2 connected\n"
        ));
    }

    #[test]
    fn a_key_hashes_by_its_tag() {
        assert_eq!(key_slot("fg:{ip:10.0.0.1}:b"), slot_of("ip:10.0.0.1"));
        assert_eq!(key_slot("foo{hash_tag}"), 2515);
        assert_eq!(key_slot("somekey"), 11058);
        assert_eq!(
            key_slot("a{}b"),
            slot_of("a{}b"),
            "an empty tag hashes the whole key"
        );
    }

    #[test]
    fn the_slot_table_names_each_slots_master() {
        let t = SlotTable::from_ranges(&[
            SlotRange {
                first: 0,
                last: 99,
                master: "a:1".into(),
            },
            SlotRange {
                first: 100,
                last: 16383,
                master: "b:1".into(),
            },
            SlotRange {
                first: 200,
                last: 200,
                master: "a:1".into(),
            },
        ]);
        assert_eq!(t.master_of(5), Some("a:1"));
        assert_eq!(t.master_of(150), Some("b:1"));
        assert_eq!(t.master_of(200), Some("a:1"));
        assert_eq!(SlotTable::default().master_of(5), None);
    }

    #[test]
    fn slots_are_computed_as_redis_does() {
        // CLUSTER KEYSLOT somekey = 11058; foo{hash_tag} hashes "hash_tag".
        assert_eq!(slot_of("somekey"), 11058);
        assert_eq!(slot_of("hash_tag"), 2515);
    }

    #[test]
    fn cluster_slots_reply_gives_ranges_and_masters() {
        let node = |port: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node(7000),
                node(7003),
            ]),
            Value::Array(vec![Value::Int(5461), Value::Int(16383), node(7001)]),
        ]);
        assert_eq!(
            parse_cluster_slots(&reply),
            Some(vec![
                SlotRange {
                    first: 0,
                    last: 5460,
                    master: "127.0.0.1:7000".into()
                },
                SlotRange {
                    first: 5461,
                    last: 16383,
                    master: "127.0.0.1:7001".into()
                },
            ])
        );
        assert_eq!(parse_cluster_slots(&Value::Int(1)), None);
    }

    #[test]
    fn cluster_nodes_text_gives_live_masters() {
        let text = "a 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460\n\
                    b 127.0.0.1:7001@17001 master,fail - 0 0 2 connected\n\
                    c 127.0.0.1:7003@17003 slave a 0 0 1 connected\n\
                    d 127.0.0.1:7004@17004 master - 0 0 4 connected 5461-10922\n";
        assert_eq!(
            parse_cluster_masters(text),
            vec![
                ("127.0.0.1".to_string(), 7000),
                ("127.0.0.1".to_string(), 7004)
            ]
        );
    }
}
