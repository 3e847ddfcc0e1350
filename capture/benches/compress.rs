//! zstd on corpus traffic: throughput of one core and the compression ratio, per level, for
//! the 1 MiB chunks the writers hand on.
//!
//! Run: `cargo bench -p tapstream --bench compress` (the ratio is printed before each group).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tapstream::store::compress::{Compression, Compressor};
use tapstream_pcap::RecordHeader;

/// PCAP records of the tcpdump corpus, repeated to fill a 1 MiB chunk.
fn corpus_chunk() -> Vec<u8> {
    let frames = tapstream_testenv::corpus_frames();
    let mut chunk = Vec::with_capacity(1 << 20);
    let mut ts = 1_795_000_000_000_000_000u64;
    'fill: loop {
        for f in &frames {
            if chunk.len() + 16 + f.data.len() > 1 << 20 {
                break 'fill;
            }
            ts += 1_000;
            let h = RecordHeader {
                ts_sec: (ts / 1_000_000_000) as u32,
                ts_frac: (ts % 1_000_000_000) as u32,
                caplen: f.data.len() as u32,
                origlen: f.data.len() as u32,
            };
            chunk.extend_from_slice(&h.encode());
            chunk.extend_from_slice(&f.data);
        }
    }
    chunk
}

fn compress(c: &mut Criterion) {
    let chunk = corpus_chunk();
    let mut group = c.benchmark_group("zstd_chunk");
    group.throughput(Throughput::Bytes(chunk.len() as u64));
    group.sample_size(20);
    for level in [1, 3, 9] {
        let mut compressor = Compressor::new(Compression::Zstd { level }).expect("a compressor");
        let out = compressor.frame(&chunk).expect("compresses");
        println!(
            "zstd level {level}: {} -> {} bytes, ratio {:.2}",
            chunk.len(),
            out.len(),
            chunk.len() as f64 / out.len() as f64
        );
        group.bench_with_input(BenchmarkId::new("level", level), &chunk, |b, chunk| {
            b.iter(|| compressor.frame(chunk).expect("compresses"))
        });
    }
    group.finish();
}

criterion_group!(benches, compress);
criterion_main!(benches);
