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
