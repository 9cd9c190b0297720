//! The codec against real traffic: every coro_rpc frame between the official
//! client and `mooncake_master` 0.3.13 in `testdata/*.pcap` decodes with our
//! types and re-encodes byte for byte; plus hostile-input tests.

use std::collections::HashMap;

use crate::codec::{pack, pack_with, unpack, CodecError, TypeCode, Wire};
use crate::rpc::{RequestHeader, ResponseHeader, REQUEST_HEADER_LEN, RESPONSE_HEADER_LEN};
use crate::types::*;

const MASTER_PORT: u16 = 51088;

// Methods the official client used in the captures that the backend never calls.
mod extra {
    use crate::codec::wire_struct;
    use crate::types::*;
    wire_struct! {
        /// `TaskAssignment` (FetchTasks; decoded only in tests).
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub(crate) struct TaskAssignment {
            pub id: Uuid,
            pub task_type: i32,
            pub payload: String,
            pub created_at_ms_epoch: i64,
            pub max_retry_attempts: u32,
        }
    }

    crate::types::rpcs! {
        GracefulUnmountSegment: (Uuid, Uuid, u64) -> Expected<()>;
        FetchTasks: (Uuid, u64) -> Expected<Vec<TaskAssignment>>;
        UpsertStart: (Uuid, String, u64, ReplicateConfig, String) -> Expected<Vec<ReplicaDescriptor>>;
        UpsertEnd: (Uuid, ObjectMeta, i32, String) -> Expected<()>;
        UpsertRevoke: (Uuid, String, i32, String) -> Expected<()>;
        BatchUpsertStart: (Uuid, Vec<String>, Vec<u64>, ReplicateConfig, String)
            -> Vec<Expected<Vec<ReplicaDescriptor>>>;
        BatchUpsertEnd: (Uuid, Vec<ObjectMeta>, i32, String) -> Vec<Expected<()>>;
        BatchUpsertRevoke: (Uuid, Vec<String>, i32, String) -> Vec<Expected<()>>;
        RemoveByRegex: (String, bool, String) -> Expected<i64>;
    }
}

/// TCP payload streams of an Ethernet pcapng file, keyed by (src port, dst port).
fn tcp_streams(pcap: &[u8]) -> HashMap<(u16, u16), Vec<u8>> {
    let u32_at = |o: usize| u32::from_le_bytes(pcap[o..o + 4].try_into().unwrap());
    let mut streams: HashMap<(u16, u16), Vec<u8>> = HashMap::new();
    assert_eq!(u32_at(0), 0x0a0d_0d0a, "pcapng section header");
    let mut off = 0;
    while off + 12 <= pcap.len() {
        let (kind, len) = (u32_at(off), u32_at(off + 4) as usize);
        if kind == 6 {
            // Enhanced packet block: iface, ts hi, ts lo, captured len, original len, data.
            let cap = u32_at(off + 20) as usize;
            let frame = &pcap[off + 28..off + 28 + cap];
            let ip = &frame[14..]; // Ethernet
            assert_eq!(ip[0] >> 4, 4, "IPv4 only");
            let ihl = usize::from(ip[0] & 15) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let tcp = &ip[ihl..total];
            let sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            let doff = usize::from(tcp[12] >> 4) * 4;
            streams
                .entry((sport, dport))
                .or_default()
                .extend_from_slice(&tcp[doff..]);
        }
        off += len;
    }
    streams
}

struct Checker {
    by_id: HashMap<u32, (&'static str, Roundtrip, Roundtrip)>,
}

type Roundtrip = fn(&[u8]) -> Result<bool, CodecError>;

fn same_args<R: Rpc>(body: &[u8]) -> Result<bool, CodecError> {
    if R::NO_ARGS {
        return Ok(body.is_empty());
    }
    let meta = R::meta();
    let v: R::Args = unpack(&meta.args, body)?;
    let mut again = Vec::new();
    pack(&meta.args, &v, &mut again);
    Ok(again == body)
}

fn same_ret<R: Rpc>(body: &[u8]) -> Result<bool, CodecError> {
    let meta = R::meta();
    let v: R::Ret = unpack(&meta.ret, body)?;
    let mut again = Vec::new();
    pack(&meta.ret, &v, &mut again);
    Ok(again == body)
}

macro_rules! table {
    ($($path:path),+ $(,)?) => {{
        let mut by_id: HashMap<u32, (&'static str, Roundtrip, Roundtrip)> = HashMap::new();
        $(
            by_id.insert(
                <$path as Rpc>::meta().function_id,
                (<$path as Rpc>::NAME, same_args::<$path> as Roundtrip, same_ret::<$path> as Roundtrip),
            );
        )+
        Checker { by_id }
    }};
}

fn checker() -> Checker {
    table!(
        ServiceReady,
        GetStorageConfig,
        Ping,
        MountSegment,
        ReMountSegment,
        UnmountSegment,
        extra::FetchTasks,
        ExistKey,
        BatchExistKey,
        GetReplicaList,
        BatchGetReplicaList,
        PutStart,
        BatchPutStart,
        PutEnd,
        BatchPutEnd,
        PutRevoke,
        BatchPutRevoke,
        Remove,
        BatchRemove,
        extra::GracefulUnmountSegment,
        extra::UpsertStart,
        extra::UpsertEnd,
        extra::UpsertRevoke,
        extra::BatchUpsertStart,
        extra::BatchUpsertEnd,
        extra::BatchUpsertRevoke,
        RemoveAll,
        extra::RemoveByRegex,
    )
}

/// Returns (frames checked, names seen).
fn check_capture(pcap: &[u8]) -> (usize, Vec<&'static str>) {
    let checker = checker();
    let streams = tcp_streams(pcap);
    let mut pending: HashMap<(u16, u32), &'static str> = HashMap::new();
    let mut checked = 0;
    let mut names = Vec::new();
    // Requests first, so each response finds its method by (client port, seq).
    let mut keys: Vec<_> = streams.keys().copied().collect();
    keys.sort_by_key(|&(s, d)| (d != MASTER_PORT, s, d));
    for (src, dst) in keys {
        if src != MASTER_PORT && dst != MASTER_PORT {
            continue; // handshake and data plane
        }
        let mut b = &streams[&(src, dst)][..];
        while !b.is_empty() {
            if dst == MASTER_PORT {
                let h = RequestHeader::parse(b[..REQUEST_HEADER_LEN].try_into().unwrap()).unwrap();
                let body = &b[REQUEST_HEADER_LEN..REQUEST_HEADER_LEN + h.length as usize];
                let mut again = [0u8; REQUEST_HEADER_LEN];
                h.write(&mut again);
                assert_eq!(
                    again[..],
                    b[..REQUEST_HEADER_LEN],
                    "request header re-encodes"
                );
                let (name, args, _) = checker
                    .by_id
                    .get(&h.function_id)
                    .unwrap_or_else(|| panic!("unknown function id {:08x}", h.function_id));
                assert!(
                    args(body).unwrap_or_else(|e| panic!("{name} request: {e}")),
                    "{name} request re-encodes"
                );
                pending.insert((src, h.seq), name);
                names.push(*name);
                b = &b[REQUEST_HEADER_LEN + h.length as usize + h.attach_length as usize..];
            } else {
                let h =
                    ResponseHeader::parse(b[..RESPONSE_HEADER_LEN].try_into().unwrap()).unwrap();
                let body = &b[RESPONSE_HEADER_LEN..RESPONSE_HEADER_LEN + h.length as usize];
                let name = pending[&(dst, h.seq)];
                let id =
                    crate::codec::function_id(&format!("mooncake::WrappedMasterService::{name}"));
                let (_, _, ret) = checker.by_id[&id];
                assert_eq!(h.err_code, 0, "{name}");
                assert!(
                    ret(body).unwrap_or_else(|e| panic!("{name} response: {e}")),
                    "{name} response re-encodes"
                );
                b = &b[RESPONSE_HEADER_LEN + h.length as usize + h.attach_length as usize..];
            }
            checked += 1;
        }
    }
    (checked, names)
}

#[test]
fn captured_frames_reencode_byte_for_byte() {
    let mut total = 0;
    let mut seen = Vec::new();
    for (file, bytes) in [
        ("cap1", &include_bytes!("../testdata/cap1.pcap")[..]),
        ("cap2", &include_bytes!("../testdata/cap2.pcap")[..]),
        ("cap4", &include_bytes!("../testdata/cap4.pcap")[..]),
    ] {
        let (n, names) = check_capture(bytes);
        assert!(n > 10, "{file}: only {n} frames");
        total += n;
        seen.extend(names);
    }
    assert_eq!(total, 150, "the captures hold 150 master frames");
    for name in [
        "ServiceReady",
        "GetStorageConfig",
        "Ping",
        "MountSegment",
        "ReMountSegment",
        "UnmountSegment",
        "ExistKey",
        "BatchExistKey",
        "GetReplicaList",
        "BatchGetReplicaList",
        "PutStart",
        "BatchPutStart",
        "PutEnd",
        "BatchPutEnd",
        "Remove",
        "BatchRemove",
    ] {
        assert!(seen.contains(&name), "{name} is not in the captures");
    }
}

#[test]
fn function_ids_match_the_spec_table() {
    assert_eq!(ServiceReady::meta().function_id, 0x7b81bb56);
    assert_eq!(GetStorageConfig::meta().function_id, 0x8da9b0a6);
    assert_eq!(Ping::meta().function_id, 0xd6c2dae5);
    assert_eq!(MountSegment::meta().function_id, 0x3e7ec4bb);
    assert_eq!(ReMountSegment::meta().function_id, 0x0b053b72);
    assert_eq!(UnmountSegment::meta().function_id, 0x6f10b465);
    assert_eq!(ExistKey::meta().function_id, 0x89385f09);
    assert_eq!(BatchExistKey::meta().function_id, 0xb89fa6b0);
    assert_eq!(GetReplicaList::meta().function_id, 0x1f7ef174);
    assert_eq!(BatchGetReplicaList::meta().function_id, 0x1b0d20ff);
    assert_eq!(PutStart::meta().function_id, 0x65ea9ac1);
    assert_eq!(BatchPutStart::meta().function_id, 0x56be1822);
    assert_eq!(PutEnd::meta().function_id, 0x8e8b2099);
    assert_eq!(BatchPutEnd::meta().function_id, 0x80e020ab);
    assert_eq!(PutRevoke::meta().function_id, 0xa0767c44);
    assert_eq!(BatchPutRevoke::meta().function_id, 0xb82567aa);
    assert_eq!(Remove::meta().function_id, 0xf1b09774);
    assert_eq!(BatchRemove::meta().function_id, 0x5902407d);
}

#[test]
fn type_hashes_match_the_spec_table() {
    // Shown with bit 0 set, as sent with a metainfo byte.
    let head = |c: &TypeCode| c.hash() | 1;
    assert_eq!(
        head(&PutStart::meta().args),
        u32::from_le_bytes([0x0f, 0xbd, 0x85, 0xe3])
    );
    assert_eq!(
        head(&PutRevoke::meta().args),
        u32::from_le_bytes([0x8b, 0x22, 0x7a, 0x1b])
    );
    assert_eq!(
        head(&BatchPutRevoke::meta().args),
        u32::from_le_bytes([0x45, 0x5d, 0xee, 0x94])
    );
    assert_eq!(
        head(&GetReplicaList::meta().ret),
        u32::from_le_bytes([0x6d, 0x27, 0xc6, 0x88])
    );
}

fn put_start_args(key: String) -> <PutStart as Rpc>::Args {
    (
        Uuid {
            first: 1,
            second: 2,
        },
        key,
        25,
        ReplicateConfig::default(),
        "default".to_string(),
    )
}

#[test]
fn long_keys_switch_every_length_to_two_bytes() {
    let meta = PutStart::meta();
    let mut out = Vec::new();
    pack(&meta.args, &put_start_args("L".repeat(300)), &mut out);
    assert_eq!(out[4], 0x0c, "metainfo: literal + 2-byte lengths");
    let tail = b"\x07\x00default";
    assert!(out.ends_with(tail), "the tenant's length is 2 bytes too");
    let back: <PutStart as Rpc>::Args = unpack(&meta.args, &out).unwrap();
    assert_eq!(back.1.len(), 300);

    // 70 000 keys in a batch: 4-byte lengths.
    let keys: Vec<String> = (0..70_000).map(|i| format!("k{i}")).collect();
    let m = BatchExistKey::meta();
    let mut out = Vec::new();
    pack(&m.args, &(keys.clone(), "default".to_string()), &mut out);
    assert_eq!(out[4], 0x14);
    let back: <BatchExistKey as Rpc>::Args = unpack(&m.args, &out).unwrap();
    assert_eq!(back.0, keys);
}

#[test]
fn minimal_form_without_literal_decodes() {
    let meta = ExistKey::meta();
    let v = ("key_A".to_string(), "default".to_string());
    let mut out = Vec::new();
    pack_with(&meta.args, &v, false, &mut out);
    assert_eq!(out.len(), 4 + 1 + 5 + 1 + 7, "hash alone, no metainfo");
    assert_eq!(u32::from_le_bytes(out[..4].try_into().unwrap()) & 1, 0);
    assert_eq!(
        unpack::<<ExistKey as Rpc>::Args>(&meta.args, &out).unwrap(),
        v
    );
    let long = ("x".repeat(1000), "default".to_string());
    let mut out = Vec::new();
    pack_with(&meta.args, &long, false, &mut out);
    assert_eq!(out[4], 0x08);
    assert_eq!(
        unpack::<<ExistKey as Rpc>::Args>(&meta.args, &out).unwrap(),
        long
    );
}

#[test]
fn malformed_frames_are_errors() {
    let meta = GetReplicaList::meta();
    // A captured response (hex_examples.md, GetReplicaList).
    let good = hex("6d27c6880487fd84fd0486fdfd0404800c800cfffffdfd0404800c800cfffffd800c04fffdfd04048989ff04800cfffd800c04040401ffff01ff048504ff010001010100000000000000001900000000000000000000c3db7f0000037463700f3132372e302e302e313a313638333003000000102700000000000000");
    let v: <GetReplicaList as Rpc>::Ret = unpack(&meta.ret, &good).unwrap();
    let list = v.unwrap();
    assert_eq!(list.lease_ttl_ms, 10_000);
    assert_eq!(list.replicas[0].status, REPLICA_COMPLETE);

    // Every truncation fails cleanly.
    for cut in 0..good.len() {
        assert!(
            unpack::<<GetReplicaList as Rpc>::Ret>(&meta.ret, &good[..cut]).is_err(),
            "cut {cut}"
        );
    }
    // Trailing garbage.
    let mut long = good.clone();
    long.push(0);
    assert_eq!(
        unpack::<<GetReplicaList as Rpc>::Ret>(&meta.ret, &long),
        Err(CodecError::TrailingBytes(1))
    );
    // Wrong hash: decoding an ExistKey response as this type.
    let exist = hex("d300e89004870b01000101");
    assert!(matches!(
        unpack::<<GetReplicaList as Rpc>::Ret>(&meta.ret, &exist),
        Err(CodecError::HashMismatch { .. })
    ));
    // Right hash, wrong literal.
    let mut bad_lit = good.clone();
    bad_lit[7] ^= 0xff;
    assert_eq!(
        unpack::<<GetReplicaList as Rpc>::Ret>(&meta.ret, &bad_lit),
        Err(CodecError::LiteralMismatch)
    );
    // A huge vector length (8-byte widths) must not allocate: metainfo 0x1c.
    let m = BatchExistKey::meta();
    let mut huge = Vec::new();
    huge.extend_from_slice(&(m.ret.hash() | 1).to_le_bytes());
    huge.push(0x18);
    huge.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        unpack::<<BatchExistKey as Rpc>::Ret>(&m.ret, &huge),
        Err(CodecError::LengthTooLarge { .. })
    ));
    // compatible<> bits are refused.
    let mut compat = good.clone();
    compat[4] |= 1;
    assert_eq!(
        unpack::<<GetReplicaList as Rpc>::Ret>(&meta.ret, &compat),
        Err(CodecError::UnsupportedMetainfo(0x05))
    );
}

/// Randomized hostile input: random bytes, and mutations of valid frames,
/// never panic and never allocate past the input (checked by the decoder's
/// length rule; a violation would abort on these sizes).
#[test]
fn random_and_mutated_frames_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0x6d6f6f6e);
    let mut samples: Vec<Vec<u8>> = Vec::new();
    for bytes in [
        &include_bytes!("../testdata/cap1.pcap")[..],
        &include_bytes!("../testdata/cap4.pcap")[..],
    ] {
        for ((_, dst), b) in tcp_streams(bytes) {
            if dst != MASTER_PORT {
                samples.push(b[RESPONSE_HEADER_LEN.min(b.len())..].to_vec());
            }
        }
    }
    fn all(body: &[u8]) {
        macro_rules! try_all {
            ($($r:ty),+) => {$(
                let _ = unpack::<<$r as Rpc>::Ret>(&<$r as Rpc>::meta().ret, body);
                let _ = unpack::<<$r as Rpc>::Args>(&<$r as Rpc>::meta().args, body);
            )+};
        }
        try_all!(
            ServiceReady,
            GetStorageConfig,
            Ping,
            MountSegment,
            ReMountSegment,
            extra::FetchTasks,
            ExistKey,
            BatchExistKey,
            GetReplicaList,
            BatchGetReplicaList,
            PutStart,
            BatchPutStart,
            PutEnd,
            BatchPutEnd,
            BatchPutRevoke,
            Remove,
            BatchRemove
        );
    }
    for _ in 0..20_000 {
        let n = rng.gen_range(0..64);
        let mut b: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        all(&b);
        // Valid head, random tail: reaches the payload decoders.
        let s = &samples[rng.gen_range(0..samples.len())];
        let keep = rng.gen_range(0..=s.len().min(200));
        b = s[..keep].to_vec();
        b.extend((0..rng.gen_range(0..32)).map(|_| rng.gen::<u8>()));
        all(&b);
        // Bit flips in a whole valid stream.
        let mut m = s.clone();
        for _ in 0..rng.gen_range(1..4) {
            if !m.is_empty() {
                let i = rng.gen_range(0..m.len());
                m[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        all(&m);
    }
    // Every captured response, read as every response type, truncated anywhere.
    for s in &samples {
        for cut in 0..s.len().min(300) {
            all(&s[..cut]);
        }
    }
}

#[test]
fn wire_struct_round_trips() {
    let seg = Segment {
        id: Uuid::random(),
        name: "127.0.0.1:1".into(),
        base: 1 << 40,
        size: 64 << 20,
        te_endpoint: "127.0.0.1:2".into(),
        protocol: "tcp".into(),
        host_id: String::new(),
    };
    let meta = MountSegment::meta();
    let args = (seg, Uuid::random());
    let mut out = Vec::new();
    pack(&meta.args, &args, &mut out);
    assert_eq!(
        unpack::<<MountSegment as Rpc>::Args>(&meta.args, &out).unwrap(),
        args
    );
    let _ = <() as Wire>::max_len(&());
}

pub(crate) fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}
