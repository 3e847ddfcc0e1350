//! What a filter costs per frame: in the kernel (the generated XDP program, timed by the
//! kernel with `BPF_PROG_TEST_RUN`), against the same program with no filter; and the same
//! expressions in user space after the copy (libpcap's interpreter, as a capture tool that
//! filters after AF_XDP, like Arkime's XDP reader, must do for every frame).
//!
//! Each expression is measured 32 times over (in 32 capture slots of one program): the
//! cost one filter adds per frame is (kernel_x32 - no filter) / 32.
//!
//! Frames: a sample of the corpus (every 16th frame of an Ethernet header or more, cut to
//! the 3520 bytes a test run takes), so each figure is a mean over real traffic.
//!
//! protochain filters (libpcap's loop over IPv6 extension headers, unrolled in the kernel)
//! are each thousands of instructions, and 32 copies are more than the verifier takes: they
//! are measured 8 times over, on the sample and on a frame whose chain is as long as the
//! kernel walks (31 extension headers before UDP: every pass of the loop runs).
//!
//! Run (as root): `cargo bench -p tapstream --bench filter`

use std::{hint::black_box, time::Duration};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tapstream::filter::{CaptureFilter, CbpfProgram, LoadedFilter};

/// Copies of one expression in the program, so that its cost can be told from the noise.
const COPIES: usize = 32;

/// Copies of a protochain expression in the program.
const PROTOCHAIN_COPIES: usize = 8;

/// Measured beside the listed expressions: libpcap's one loop, which the kernel runs unrolled.
const PROTOCHAIN: [&str; 3] = ["ip6 protochain 17", "ip protochain 6", "protochain 17"];

/// An IPv6 UDP frame with 31 destination-options headers (8 bytes each) before the UDP header:
/// the longest chain protochain's unrolled loop follows to its end.
fn long_chain() -> Vec<u8> {
    const HEADERS: usize = 31;
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x86, 0xdd];
    let payload = (HEADERS * 8 + 8) as u16;
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&payload.to_be_bytes());
    frame.extend_from_slice(&[60, 64]); // next header: destination options; hop limit
    frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&[0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    for i in 0..HEADERS {
        let next = if i + 1 == HEADERS { 17 } else { 60 };
        // Next header, length 0 (8 bytes), and a PadN option filling the rest.
        frame.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
    }
    frame.extend_from_slice(&[0x30, 0x39, 0x00, 0x35, 0, 8, 0, 0]);
    frame
}

fn sample() -> Vec<Vec<u8>> {
    tapstream_testenv::corpus_frames()
        .into_iter()
        .filter(|f| f.data.len() >= 14)
        .step_by(16)
        .map(|f| f.data[..f.data.len().min(3_520)].to_vec())
        .collect()
}

/// Mean kernel time per frame of `program` over the sample, `iters` runs in all.
fn kernel_time(program: &LoadedFilter, frames: &[Vec<u8>], iters: u64) -> Duration {
    let repeat = (iters / frames.len() as u64).max(1) as u32;
    let mut total_ns = 0u64;
    for frame in frames {
        let run = program.test_run(frame, repeat).expect("test run");
        total_ns += u64::from(run.duration_ns) * u64::from(repeat);
    }
    // Scaled to the `iters` runs criterion asked for.
    Duration::from_nanos(total_ns * iters / (u64::from(repeat) * frames.len() as u64))
}

fn filters(c: &mut Criterion) {
    let frames = sample();
    let mut group = c.benchmark_group("filter");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(3));

    let none = LoadedFilter::load(&[CaptureFilter { slot: 0, filter: None }]).expect("load");
    group.bench_function(BenchmarkId::new("kernel", "no filter"), |b| {
        b.iter_custom(|iters| kernel_time(&none, &frames, iters))
    });
    let compiled: Vec<CbpfProgram> =
        tapstream_testenv::LISTED_FILTERS.iter().map(|e| CbpfProgram::compile(e).unwrap()).collect();
    for program in &compiled {
        // The expression in 32 capture slots: its cost, 32 times over, stands clear of the
        // test run's own (about 90 ns, and noisy to a few ns).
        let slots: Vec<CaptureFilter<'_>> =
            (0..COPIES).map(|slot| CaptureFilter { slot, filter: Some(program) }).collect();
        let loaded = LoadedFilter::load(&slots).expect("load");
        group.bench_function(BenchmarkId::new("kernel_x32", program.expression()), |b| {
            b.iter_custom(|iters| kernel_time(&loaded, &frames, iters))
        });
        group.bench_function(BenchmarkId::new("libpcap_user_space", program.expression()), |b| {
            let mut i = 0;
            b.iter(|| {
                let frame = &frames[i % frames.len()];
                i += 1;
                black_box(program.matches(black_box(frame), frame.len() as u32))
            })
        });
    }
    let chain = vec![long_chain()];
    group.bench_function(BenchmarkId::new("kernel_long_chain", "no filter"), |b| {
        b.iter_custom(|iters| kernel_time(&none, &chain, iters))
    });
    for expression in PROTOCHAIN {
        let program = CbpfProgram::compile(expression).unwrap();
        assert!(program.matches(&chain[0], chain[0].len() as u32) == expression.contains("17"));
        let slots: Vec<CaptureFilter<'_>> =
            (0..PROTOCHAIN_COPIES).map(|slot| CaptureFilter { slot, filter: Some(&program) }).collect();
        let loaded = LoadedFilter::load(&slots).expect("load");
        group.bench_function(BenchmarkId::new("kernel_x8", expression), |b| {
            b.iter_custom(|iters| kernel_time(&loaded, &frames, iters))
        });
        group.bench_function(BenchmarkId::new("kernel_x8_long_chain", expression), |b| {
            b.iter_custom(|iters| kernel_time(&loaded, &chain, iters))
        });
        group.bench_function(BenchmarkId::new("libpcap_user_space", expression), |b| {
            let mut i = 0;
            b.iter(|| {
                let frame = &frames[i % frames.len()];
                i += 1;
                black_box(program.matches(black_box(frame), frame.len() as u32))
            })
        });
        group.bench_function(BenchmarkId::new("libpcap_user_space_long_chain", expression), |b| {
            b.iter(|| black_box(program.matches(black_box(&chain[0]), chain[0].len() as u32)))
        });
    }
    // Every expression at once, one capture each: a busy interface's program.
    let all: Vec<CaptureFilter<'_>> =
        compiled.iter().enumerate().map(|(slot, f)| CaptureFilter { slot, filter: Some(f) }).collect();
    let loaded = LoadedFilter::load(&all).expect("load");
    group.bench_function(BenchmarkId::new("kernel", "all 14 at once"), |b| {
        b.iter_custom(|iters| kernel_time(&loaded, &frames, iters))
    });
    group.finish();
}

criterion_group!(benches, filters);
criterion_main!(benches);
