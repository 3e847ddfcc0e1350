//! Cost of appending one frame to a PCAP chunk: the writer's per-frame work after the ring.
//!
//! Run: `cargo bench -p tapstream --bench chunk`

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tapstream::{
    datapath::capture::{CaptureShared, CaptureSpec, Limits},
    datapath::chunk::{Chunk, ChunkPool},
};

fn append(c: &mut Criterion) {
    let mut group = c.benchmark_group("chunk_append");
    for (len, snaplen) in [(64usize, 262_144u32), (512, 262_144), (1514, 262_144), (1514, 128)] {
        let frame = vec![0x5au8; len];
        let pool = ChunkPool::new(1, 1 << 20);
        let capture =
            CaptureShared::new(CaptureSpec { snaplen, ..CaptureSpec::default() }, Limits::default());
        let mut chunk = Chunk::new(capture, 0, 0, pool.take().expect("a buffer"));
        let need = Chunk::record_len(len, snaplen);
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new(format!("snaplen_{snaplen}"), len), &frame, |b, frame| {
            let mut ts = 1_700_000_000_000_000_000u64;
            b.iter(|| {
                if !chunk.fits(need) {
                    chunk.data.clear();
                    chunk.frames = 0;
                }
                ts += 1;
                chunk.append(ts, frame.len() as u32, black_box(frame), snaplen);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
