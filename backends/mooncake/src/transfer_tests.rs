//! The transfer engine against a fake owner whose behaviour a real one will
//! not show on demand.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kvpool_core::{IoVecMut, MemRegion};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::transfer::{Op, TransferClient};

/// An owner that answers one READ per data connection with `fill` bytes, then
/// closes it, as an idle-connection reaper between peers would.
async fn one_shot_owner(fill: u8, connections: Arc<AtomicUsize>) -> String {
    let data = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let data_port = data.local_addr().unwrap().port();
    let hs = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = hs.local_addr().unwrap().to_string();
    let desc = serde_json::json!({
        "buffers": [], "name": endpoint, "protocol": "tcp", "rdma_server_name": "",
        "tcp_data_host": "127.0.0.1", "tcp_data_port": data_port, "tcp_proto_version": 2,
    })
    .to_string();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                Ok((mut s, _)) = data.accept() => {
                    connections.fetch_add(1, Ordering::SeqCst);
                    tokio::spawn(async move {
                        let mut h = [0u8; 24];
                        if s.read_exact(&mut h).await.is_err() {
                            return;
                        }
                        let size = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
                        let mut out = (0x4d43_5456u64 << 32).to_le_bytes().to_vec();
                        out.extend(std::iter::repeat_n(fill, size));
                        s.write_all(&out).await.unwrap();
                        // Closed once the answer is out.
                    });
                }
                Ok((mut s, _)) = hs.accept() => {
                    let n = s.read_u64_le().await.unwrap();
                    let mut b = vec![0u8; n as usize];
                    s.read_exact(&mut b).await.unwrap();
                    let mut out = ((desc.len() + 1) as u64).to_le_bytes().to_vec();
                    out.push(1);
                    out.extend_from_slice(desc.as_bytes());
                    s.write_all(&out).await.unwrap();
                }
            }
        }
    });
    endpoint
}

#[test]
fn a_closed_idle_connection_is_replaced_transparently() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let connections = Arc::new(AtomicUsize::new(0));
        let endpoint = one_shot_owner(0x5a, connections.clone()).await;
        let client = Arc::new(TransferClient::new(
            "127.0.0.1:0",
            "127.0.0.1",
            None,
            Duration::from_secs(1),
            Duration::from_secs(1),
            String::new(),
        ));
        for round in 0..3 {
            let dst = MemRegion::alloc(1000);
            let ops = vec![Op::Read {
                addr: 0x1000,
                dst: IoVecMut::whole(&dst),
            }];
            let out = client.run(&endpoint, ops).await;
            assert!(out[0].is_ok(), "round {round}: {:?}", out[0]);
            assert_eq!(dst.read(0, 1000).unwrap(), vec![0x5a; 1000]);
            // Let the owner's close reach us before the connection is reused.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(connections.load(Ordering::SeqCst) >= 3);
    });
}

/// A pipelined batch of small and large reads, a write between them and a rejected request
/// last: the owner answers every one in order, byte for byte, and ends the session at the
/// rejection; the write lands in the segment.
#[test]
fn the_owner_answers_a_pipelined_batch_in_order_byte_for_byte() {
    use crate::transfer::{serve_session, LocalSegment};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let region = MemRegion::alloc(1 << 20);
    let pattern: Vec<u8> = (0..region.len()).map(|i| (i * 7 % 251) as u8).collect();
    region.write(0, &pattern).unwrap();
    let segment = LocalSegment::new(region.clone());
    let base = segment.base();
    let request = |size: usize, at: usize, op: u8| {
        let mut h = (size as u64).to_le_bytes().to_vec();
        h.extend_from_slice(&(base + at as u64).to_le_bytes());
        h.push(op | 0x80);
        h.extend_from_slice(&[0u8; 7]);
        h
    };
    let ok = (0x4d43_5456u64 << 32).to_le_bytes();
    let rejected = ((0x4d43_5456u64 << 32) | 1).to_le_bytes();
    // (size, offset) of each read: below, at and far above the copy threshold.
    let reads = [
        (100, 10),
        (4096, 5000),
        (65536, 70000),
        (300 << 10, 200 << 10),
        (1, 0),
    ];
    let mut batch = Vec::new();
    let mut expected = Vec::new();
    for (i, &(size, at)) in reads.iter().enumerate() {
        batch.extend(request(size, at, 0));
        expected.extend_from_slice(&ok);
        expected.extend_from_slice(&pattern[at..at + size]);
        if i == 2 {
            // A write of 10 bytes in the middle of the batch.
            batch.extend(request(10, 900_000, 1));
            batch.extend_from_slice(&[0xee; 10]);
            expected.extend_from_slice(&ok);
        }
    }
    // Past the segment's end: rejected, and the session ends.
    batch.extend(request(8, (1 << 20) - 4, 0));
    expected.extend_from_slice(&rejected);
    batch.extend(request(100, 10, 0));

    let answer = rt.block_on(async {
        let (mut client, owner) = tokio::io::duplex(64 << 10);
        let served = tokio::spawn(async move { serve_session(owner, &segment).await });
        let writer = async {
            client.write_all(&batch).await.unwrap();
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            answer
        };
        let answer = writer.await;
        served.await.unwrap().unwrap();
        answer
    });
    assert_eq!(answer.len(), expected.len());
    assert!(
        answer == expected,
        "the answers differ from the segment's bytes"
    );
    assert_eq!(region.read(900_000, 10).unwrap(), vec![0xee; 10]);
}

/// A segment of `len` bytes holding a pattern, and the pattern.
fn patterned_segment(len: usize) -> (Arc<crate::transfer::LocalSegment>, Vec<u8>) {
    let region = MemRegion::alloc(len);
    let pattern: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
    region.write(0, &pattern).unwrap();
    (
        Arc::new(crate::transfer::LocalSegment::new(region)),
        pattern,
    )
}

/// Thousands of reads of a few bytes to 70 KiB, each scattered over three slices of a
/// destination, with writes among them, between a client and an owner over TCP: more
/// answers than one `readv` or `writev` takes, arriving in pieces that end mid-status and
/// mid-slice. Every read holds exactly the owner's bytes, and every write lands.
#[test]
fn many_pipelined_reads_land_byte_for_byte_in_scattered_destinations() {
    use crate::transfer::TransferServer;
    use kvpool_core::IoVec;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (segment, pattern) = patterned_segment(8 << 20);
        let base = segment.base();
        let server = TransferServer::start("127.0.0.1", segment.clone(), "cubic".into())
            .await
            .unwrap();
        let client = Arc::new(TransferClient::new(
            "127.0.0.1:0",
            "127.0.0.1",
            None,
            Duration::from_secs(5),
            Duration::from_secs(30),
            "cubic".into(),
        ));
        let sizes: Vec<usize> = (0..3000)
            .map(|i| [3, 100, 4096, 65536, 70_001][i % 5])
            .collect();
        let dst = MemRegion::alloc(sizes.iter().sum::<usize>() + 3 * sizes.len());
        let src = MemRegion::from_vec(vec![0xa7; 5000]);
        let (mut ops, mut expected) = (Vec::new(), Vec::new());
        let mut out_at = 0usize;
        for (i, &size) in sizes.iter().enumerate() {
            // Three slices, one byte apart: a byte of every gap must stay untouched.
            let mut iov = IoVecMut::new();
            let cuts = [0, size / 3, 2 * size / 3, size];
            for w in cuts.windows(2) {
                if w[1] > w[0] {
                    iov.push(&dst, out_at, w[1] - w[0]).unwrap();
                    out_at += w[1] - w[0] + 1;
                }
            }
            let from = (i * 7919) % (6 << 20);
            ops.push(Op::Read {
                addr: base + from as u64,
                dst: iov.clone(),
            });
            expected.push((iov, pattern[from..from + size].to_vec()));
            if i % 500 == 250 {
                ops.push(Op::Write {
                    addr: base + (7 << 20) as u64 + i as u64,
                    src: IoVec::whole(&src),
                });
            }
        }
        let results = client.run(server.endpoint(), ops).await;
        assert!(
            results.iter().all(Result::is_ok),
            "{:?}",
            results.iter().find(|r| r.is_err())
        );
        for (k, (iov, want)) in expected.iter().enumerate() {
            assert!(
                iov.to_vec() == *want,
                "read {k} of {} bytes differs",
                want.len()
            );
        }
        let gaps = dst.read(0, dst.len()).unwrap();
        let mut off = 0;
        for &size in &sizes {
            let cuts = [0, size / 3, 2 * size / 3, size];
            for w in cuts.windows(2) {
                if w[1] > w[0] {
                    off += w[1] - w[0];
                    assert_eq!(gaps[off], 0, "a byte between two slices was written");
                    off += 1;
                }
            }
        }
        let seg = segment_bytes(&segment, 7 << 20, 5000 + 3000);
        for i in (250..3000).step_by(500) {
            assert_eq!(
                &seg[i..i + 5000],
                &[0xa7; 5000][..],
                "the write at {i} did not land"
            );
        }
    });
}

fn segment_bytes(segment: &crate::transfer::LocalSegment, offset: usize, len: usize) -> Vec<u8> {
    let dst = MemRegion::alloc(len);
    assert!(segment.read_into(segment.base() + offset as u64, &IoVecMut::whole(&dst)));
    dst.read(0, len).unwrap()
}

/// A rejected request in the middle of a pipelined batch over TCP: the reads before it hold
/// the owner's bytes, it fails as rejected, and those after it fail without touching their
/// destinations.
#[test]
fn a_rejected_request_fails_itself_and_the_rest_of_the_batch_only() {
    use crate::transfer::{pipeline, serve_session, TransferError};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (segment, pattern) = patterned_segment(1 << 20);
        let base = segment.base();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let owner = {
            let segment = segment.clone();
            tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                serve_session(stream, &segment).await
            })
        };
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let dsts: Vec<_> = (0..4).map(|_| MemRegion::alloc(300 << 10)).collect();
        let read = |i: usize, at: u64| Op::Read {
            addr: at,
            dst: IoVecMut::whole(&dsts[i]),
        };
        let ops = vec![
            read(0, base),
            read(1, base + 4096),
            // Past the segment's end.
            read(2, base + (1 << 20) - 100),
            read(3, base),
        ];
        let results = pipeline(&mut conn, true, "owner", &ops).await.unwrap();
        assert!(results[0].is_ok() && results[1].is_ok(), "{results:?}");
        assert!(dsts[0].read(0, 300 << 10).unwrap() == pattern[..300 << 10]);
        assert!(dsts[1].read(0, 300 << 10).unwrap() == pattern[4096..4096 + (300 << 10)]);
        assert!(
            matches!(results[2], Err(TransferError::Rejected { .. })),
            "{:?}",
            results[2]
        );
        assert!(results[3].is_err());
        for d in &dsts[2..] {
            assert!(d.read(0, d.len()).unwrap().iter().all(|&b| b == 0));
        }
        owner.await.unwrap().unwrap();
    });
}
