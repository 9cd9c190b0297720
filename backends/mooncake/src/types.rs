//! Mooncake Store's master RPC types (0.3.13, store version "2.0.0"), in the
//! field order of their `YLT_REFL` declarations, which is their wire order.

use std::fmt;

use crate::codec::{wire_struct, CodecError, Reader, Wire, Writer};

/// `mooncake::UUID` = `std::pair<uint64_t, uint64_t>`, trivially copyable:
/// its literal carries pack and alignment sizes (`fd 04 04 89 89 ff`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub(crate) struct Uuid {
    pub first: u64,
    pub second: u64,
}

impl Uuid {
    pub(crate) fn random() -> Self {
        Uuid {
            first: rand::random(),
            second: rand::random(),
        }
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{:016x}", self.first, self.second)
    }
}

impl Wire for Uuid {
    fn literal(out: &mut Vec<u8>) {
        // Fields, then size literals of pack alignment (8) and alignment (8).
        out.extend_from_slice(&[0xfd, 0x04, 0x04, 0x89, 0x89, 0xff]);
    }
    fn max_len(&self) -> usize {
        0
    }
    fn encode(&self, w: &mut Writer) {
        self.first.encode(w);
        self.second.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Uuid {
            first: u64::decode(r)?,
            second: u64::decode(r)?,
        })
    }
}

/// `mooncake::ErrorCode`, an `int32_t` enum.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ErrorCode(pub i32);

impl ErrorCode {
    pub const NO_AVAILABLE_HANDLE: ErrorCode = ErrorCode(-200);
    pub const REPLICA_IS_NOT_READY: ErrorCode = ErrorCode(-703);
    pub const OBJECT_NOT_FOUND: ErrorCode = ErrorCode(-704);
    pub const OBJECT_ALREADY_EXISTS: ErrorCode = ErrorCode(-705);
    pub const OBJECT_HAS_LEASE: ErrorCode = ErrorCode(-706);
    pub const LEASE_EXPIRED: ErrorCode = ErrorCode(-707);

    /// The enumerator name in `types.h`, for messages.
    pub(crate) fn name(self) -> &'static str {
        match self.0 {
            0 => "OK",
            -1 => "INTERNAL_ERROR",
            -10 => "BUFFER_OVERFLOW",
            -101 => "SEGMENT_NOT_FOUND",
            -102 => "SEGMENT_ALREADY_EXISTS",
            -103 => "CLIENT_NOT_FOUND",
            -200 => "NO_AVAILABLE_HANDLE",
            -300 => "INVALID_VERSION",
            -400 => "INVALID_KEY",
            -600 => "INVALID_PARAMS",
            -601 => "ILLEGAL_CLIENT",
            -703 => "REPLICA_IS_NOT_READY",
            -704 => "OBJECT_NOT_FOUND",
            -705 => "OBJECT_ALREADY_EXISTS",
            -706 => "OBJECT_HAS_LEASE",
            -707 => "LEASE_EXPIRED",
            -710 => "REPLICA_NOT_FOUND",
            -800 => "TRANSFER_FAIL",
            -801 => "CHECKSUM_MISMATCH",
            -900 => "RPC_FAIL",
            -901 => "RPC_TIMEOUT",
            -1700 => "TENANT_QUOTA_EXCEEDED",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Wire for ErrorCode {
    fn literal(out: &mut Vec<u8>) {
        i32::literal(out);
    }
    fn max_len(&self) -> usize {
        0
    }
    fn encode(&self, w: &mut Writer) {
        self.0.encode(w);
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        i32::decode(r).map(ErrorCode)
    }
}

/// `tl::expected<T, ErrorCode>`.
pub(crate) type Expected<T> = Result<T, ErrorCode>;

wire_struct! {
    /// `mooncake::Segment`: memory a client contributes to the pool.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct Segment {
        pub id: Uuid,
        pub name: String,
        pub base: u64,
        pub size: u64,
        pub te_endpoint: String,
        pub protocol: String,
        pub host_id: String,
    }
}

wire_struct! {
    /// `mooncake::ReplicateConfig` (13 fields; the type hash covers all of them).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct ReplicateConfig {
        pub replica_num: u64,
        pub nof_replica_num: u64,
        pub dfs_replica_num: u64,
        pub soft_pin_action: u8,
        pub soft_pin_ttl_ms: Option<u64>,
        pub with_hard_pin: bool,
        pub preferred_segments: Vec<String>,
        pub preferred_segment: String,
        pub preferred_nof_segments: Vec<String>,
        pub prefer_alloc_in_same_node: bool,
        pub data_type: u8,
        pub host_id: String,
        pub group_ids: Option<Vec<String>>,
    }
}

impl Default for ReplicateConfig {
    fn default() -> Self {
        ReplicateConfig {
            replica_num: 1,
            nof_replica_num: 0,
            dfs_replica_num: 0,
            soft_pin_action: 0,
            soft_pin_ttl_ms: None,
            with_hard_pin: false,
            preferred_segments: Vec::new(),
            preferred_segment: String::new(),
            preferred_nof_segments: Vec::new(),
            prefer_alloc_in_same_node: false,
            data_type: 0,
            host_id: String::new(),
            group_ids: None,
        }
    }
}

wire_struct! {
    /// `mooncake::ObjectMeta`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct ObjectMeta {
        pub key: String,
        pub object_checksum: Option<u64>,
    }
}

wire_struct! {
    /// `AllocatedBuffer::Descriptor`: where a replica's bytes live.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct BufferDescriptor {
        pub size: u64,
        pub buffer_address: u64,
        pub protocol: String,
        pub transport_endpoint: String,
    }
}

wire_struct! {
    /// `DiskDescriptor`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct DiskDescriptor {
        pub file_path: String,
        pub object_size: u64,
    }
}

wire_struct! {
    /// `LocalDiskDescriptor`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct LocalDiskDescriptor {
        pub client_id: Uuid,
        pub object_size: u64,
        pub transport_endpoint: String,
    }
}

wire_struct! {
    /// `DistributedFSDescriptor`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct DfsDescriptor {
        pub file_path: String,
        pub offset: u64,
        pub object_size: u64,
        pub aligned_size: u64,
        pub shard_idx: i32,
    }
}

/// The `std::variant` inside `Replica::Descriptor`. Memory and NoF
/// descriptors are one-field structs around a buffer descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplicaLocation {
    Memory(BufferDescriptor),
    NoF(BufferDescriptor),
    Disk(DiskDescriptor),
    LocalDisk(LocalDiskDescriptor),
    Dfs(DfsDescriptor),
}

impl Wire for ReplicaLocation {
    fn literal(out: &mut Vec<u8>) {
        out.push(0x86);
        for _ in 0..2 {
            out.push(0xfd);
            BufferDescriptor::literal(out);
            out.push(0xff);
        }
        DiskDescriptor::literal(out);
        LocalDiskDescriptor::literal(out);
        DfsDescriptor::literal(out);
        out.push(0xff);
    }
    fn max_len(&self) -> usize {
        match self {
            ReplicaLocation::Memory(d) | ReplicaLocation::NoF(d) => d.max_len(),
            ReplicaLocation::Disk(d) => d.max_len(),
            ReplicaLocation::LocalDisk(d) => d.max_len(),
            ReplicaLocation::Dfs(d) => d.max_len(),
        }
    }
    fn encode(&self, w: &mut Writer) {
        let (tag, _) = self.tag();
        w.buf.push(tag);
        match self {
            ReplicaLocation::Memory(d) | ReplicaLocation::NoF(d) => d.encode(w),
            ReplicaLocation::Disk(d) => d.encode(w),
            ReplicaLocation::LocalDisk(d) => d.encode(w),
            ReplicaLocation::Dfs(d) => d.encode(w),
        }
    }
    fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(match u8::decode(r)? {
            0 => ReplicaLocation::Memory(BufferDescriptor::decode(r)?),
            1 => ReplicaLocation::NoF(BufferDescriptor::decode(r)?),
            2 => ReplicaLocation::Disk(DiskDescriptor::decode(r)?),
            3 => ReplicaLocation::LocalDisk(LocalDiskDescriptor::decode(r)?),
            4 => ReplicaLocation::Dfs(DfsDescriptor::decode(r)?),
            tag => {
                return Err(CodecError::BadTag {
                    what: "replica descriptor variant",
                    tag,
                })
            }
        })
    }
}

impl ReplicaLocation {
    fn tag(&self) -> (u8, &'static str) {
        match self {
            ReplicaLocation::Memory(_) => (0, "memory"),
            ReplicaLocation::NoF(_) => (1, "nof"),
            ReplicaLocation::Disk(_) => (2, "disk"),
            ReplicaLocation::LocalDisk(_) => (3, "local disk"),
            ReplicaLocation::Dfs(_) => (4, "dfs"),
        }
    }

    /// The kind, for messages.
    pub(crate) fn kind(&self) -> &'static str {
        self.tag().1
    }
}

/// `ReplicaStatus::COMPLETE`: the only state a reader may use.
pub(crate) const REPLICA_COMPLETE: i32 = 3;

wire_struct! {
    /// `Replica::Descriptor`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct ReplicaDescriptor {
        pub id: u64,
        pub location: ReplicaLocation,
        pub status: i32,
    }
}

wire_struct! {
    /// `GetReplicaListResponse`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct ReplicaList {
        pub replicas: Vec<ReplicaDescriptor>,
        pub lease_ttl_ms: u64,
        pub object_checksum: Option<u64>,
    }
}

/// `ClientStatus::NEED_REMOUNT` in a [`PingResponse`].
pub(crate) const CLIENT_NEED_REMOUNT: i32 = 2;

wire_struct! {
    /// `PingResponse`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct PingResponse {
        pub view_version_id: i64,
        pub client_status: i32,
    }
}

wire_struct! {
    /// `GetStorageConfigResponse`.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(crate) struct StorageConfig {
        pub fsdir: String,
        pub enable_disk_eviction: bool,
        pub quota_bytes: u64,
    }
}

/// `ReplicaType::ALL`, what the official client passes to PutEnd/PutRevoke.
pub(crate) const REPLICA_TYPE_ALL: i32 = 4;

/// One master RPC: its name (which gives the function id) and types.
pub(crate) trait Rpc {
    /// `WrappedMasterService::<NAME>`.
    const NAME: &'static str;
    /// The argument pack: one type, or a tuple for several.
    type Args: Wire;
    /// Zero-argument functions send an empty body, not an encoded `()`.
    const NO_ARGS: bool;
    /// The return type.
    type Ret: Wire;
    /// The constants, computed once.
    fn meta() -> &'static RpcMeta;
}

/// An RPC's function id and the type codes of its request and response.
#[derive(Debug)]
pub(crate) struct RpcMeta {
    pub function_id: u32,
    pub args: crate::codec::TypeCode,
    pub ret: crate::codec::TypeCode,
}

macro_rules! rpcs {
    ($($name:ident : ($($arg:ty),*) -> $ret:ty;)+) => {
        $(
            #[derive(Debug)]
            pub(crate) struct $name;
            impl Rpc for $name {
                const NAME: &'static str = stringify!($name);
                type Args = rpcs!(@args $($arg),*);
                const NO_ARGS: bool = {
                    let args: &[&str] = &[$(stringify!($arg)),*];
                    args.is_empty()
                };
                type Ret = $ret;
                fn meta() -> &'static RpcMeta {
                    static META: std::sync::OnceLock<RpcMeta> = std::sync::OnceLock::new();
                    META.get_or_init(|| RpcMeta {
                        function_id: crate::codec::function_id(concat!(
                            "mooncake::WrappedMasterService::",
                            stringify!($name)
                        )),
                        args: crate::codec::TypeCode::of::<Self::Args>(),
                        ret: crate::codec::TypeCode::of::<$ret>(),
                    })
                }
            }
        )+

        /// Decodes `body` as the return type of every RPC above, ignoring the
        /// results: the fuzz entry point, kept next to the list so a new RPC
        /// is fuzzed without another list to update.
        // The test-only RPCs of capture_tests expand this too, unused there.
        #[allow(dead_code)]
        pub(crate) fn unpack_every_ret(body: &[u8]) {
            $(
                let _ = crate::codec::unpack::<$ret>(&<$name as Rpc>::meta().ret, body);
            )+
        }
    };
    (@args) => { () };
    (@args $one:ty) => { $one };
    (@args $($arg:ty),+) => { ($($arg,)+) };
}

// Argument order is the C++ signature's; the trailing String is tenant_id.
rpcs! {
    ServiceReady: () -> Expected<String>;
    GetStorageConfig: () -> Expected<StorageConfig>;
    Ping: (Uuid) -> Expected<PingResponse>;
    MountSegment: (Segment, Uuid) -> Expected<()>;
    ReMountSegment: (Vec<Segment>, Uuid) -> Expected<()>;
    UnmountSegment: (Uuid, Uuid) -> Expected<()>;
    ExistKey: (String, String) -> Expected<bool>;
    BatchExistKey: (Vec<String>, String) -> Vec<Expected<bool>>;
    GetReplicaList: (String, String) -> Expected<ReplicaList>;
    BatchGetReplicaList: (Vec<String>, String) -> Vec<Expected<ReplicaList>>;
    PutStart: (Uuid, String, u64, ReplicateConfig, String) -> Expected<Vec<ReplicaDescriptor>>;
    BatchPutStart: (Uuid, Vec<String>, Vec<u64>, ReplicateConfig, String)
        -> Vec<Expected<Vec<ReplicaDescriptor>>>;
    PutEnd: (Uuid, ObjectMeta, i32, String) -> Expected<()>;
    BatchPutEnd: (Uuid, Vec<ObjectMeta>, i32, String) -> Vec<Expected<()>>;
    PutRevoke: (Uuid, String, i32, String) -> Expected<()>;
    BatchPutRevoke: (Uuid, Vec<String>, i32, String) -> Vec<Expected<()>>;
    Remove: (String, bool, String) -> Expected<()>;
    BatchRemove: (Vec<String>, bool, String) -> Vec<Expected<()>>;
    RemoveAll: (bool, String) -> i64;
}

#[cfg(test)]
pub(crate) use rpcs;
