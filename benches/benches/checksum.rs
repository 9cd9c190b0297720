//! The Mooncake backend's CRC-64/ECMA-182 (the `crc` crate, slice-by-16)
//! against the byte-at-a-time table loop it replaced, measured in the same
//! run: compare `512KiB/crc_crate` with `512KiB/byte_table`. Run with
//! `cargo bench -p kvpool-benches --bench checksum`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvpool_backend_mooncake::checksum::crc64;
use rand::RngCore;

const SIZES: &[(&str, usize)] = &[("4KiB", 4 << 10), ("512KiB", 512 << 10)];

/// The baseline: the backend's former implementation, kept only here.
mod byte_table {
    const POLY: u64 = 0x42f0_e1eb_a9ea_3693;

    const TABLE: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = (i as u64) << 56;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & (1 << 63) != 0 {
                    (crc << 1) ^ POLY
                } else {
                    crc << 1
                };
                bit += 1;
            }
            t[i] = crc;
            i += 1;
        }
        t
    };

    pub(crate) fn crc64<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> u64 {
        let mut crc = 0u64;
        for chunk in chunks {
            for &b in chunk {
                crc = (crc << 8) ^ TABLE[(((crc >> 56) as u8) ^ b) as usize];
            }
        }
        crc
    }
}

fn checksum(c: &mut Criterion) {
    for &(name, len) in SIZES {
        let mut buf = vec![0u8; len];
        rand::thread_rng().fill_bytes(&mut buf);
        // A faster checksum that disagrees would be worthless.
        assert_eq!(crc64([&buf[..]]), byte_table::crc64([&buf[..]]));

        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_function("byte_table", |b| {
            b.iter(|| byte_table::crc64([std::hint::black_box(&buf[..])]))
        });
        group.bench_function("crc_crate", |b| {
            b.iter(|| crc64([std::hint::black_box(&buf[..])]))
        });
        group.finish();
    }
}

criterion_group!(benches, checksum);
criterion_main!(benches);
