//! tapstream's XDP program.
//!
//! Attached to a capture interface, it sees every received frame before the kernel stack does:
//!
//! 1. `tapstream_xdp` (attached) counts the frame, writes a [`FrameMeta`] (receive time, wire
//!    length, capture mask) in the metadata area before the frame, and tail-calls the filter
//!    program in `FILTERS[FILTER_SLOT]`, which user space generates from the captures'
//!    tcpdump expressions and swaps atomically when captures start or stop.
//! 2. The filter program sets the mask of captures that want the frame and tail-calls
//!    `tapstream_redirect`. With no filter program installed, the tail call falls through and
//!    the mask is `CONFIG.default_mask` (every running capture).
//! 3. `tapstream_redirect` cuts frames longer than a UMEM frame, and redirects wanted frames
//!    into the AF_XDP socket of their RX queue (`XSKS`). Unwanted frames are passed or dropped
//!    as configured.
//!
//! Minimum kernel: 6.1 (`bpf_ktime_get_tai_ns`); tested on 6.18. The driver must support XDP
//! metadata (veth, generic mode and the common zero-copy drivers do).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_ktime_get_tai_ns, bpf_xdp_adjust_meta, bpf_xdp_adjust_tail},
    macros::{map, xdp},
    maps::{Array, PerCpuArray, ProgramArray, XskMap},
    programs::XdpContext,
};
use aya_log_ebpf::warn;
use capture_common::{FILTER_SLOT, FRAME_META_LEN, FrameMeta, MAX_QUEUES, Unmatched, XdpConfig, XdpCounters};

/// Frame counters per RX queue, each with one slot per CPU (no atomics needed: XDP runs with
/// preemption disabled, and a CPU only writes its own slot).
#[map]
static COUNTERS: PerCpuArray<XdpCounters> = PerCpuArray::with_max_entries(MAX_QUEUES, 0);

/// Settings written by user space (one entry).
#[map]
static CONFIG: Array<XdpConfig> = Array::with_max_entries(1, 0);

/// The AF_XDP socket of each RX queue.
#[map]
static XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);

/// The generated filter program, in slot `FILTER_SLOT`.
#[map]
static FILTERS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Entry point attached to the interface.
#[xdp]
pub fn tapstream_xdp(ctx: XdpContext) -> u32 {
    let Some(counters) = counters(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let config = CONFIG.get(0).copied().unwrap_or_default();
    // SAFETY: this CPU's slot of the per-CPU map, written only by this CPU (see COUNTERS).
    unsafe { (*counters).seen += 1 };
    let orig_len = (ctx.data_end() - ctx.data()) as u32;

    // SAFETY: `ctx.ctx` is the context the kernel passed; a negative delta grows the metadata
    // area in front of the frame (it fails, without changing anything, if there is no room).
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx.cast(), -(FRAME_META_LEN as i32)) } != 0 {
        // SAFETY: as above.
        let first = unsafe {
            (*counters).meta_errors += 1;
            (*counters).meta_errors == 1
        };
        if first {
            warn!(&ctx, "no room for XDP metadata: frames are not captured on this CPU");
        }
        return verdict(&config);
    }
    let Some(meta) = meta_ptr(&ctx) else {
        return unmatched(counters, &config);
    };
    // SAFETY: `meta_ptr` checked that the metadata area holds a whole FrameMeta.
    unsafe {
        meta.write_unaligned(FrameMeta {
            // Read in `redirect`, only for the frames a capture wants.
            rx_tai_ns: 0,
            mask: config.default_mask,
            orig_len,
            generation: config.generation,
        })
    };

    // SAFETY: the filter program is an XDP program loaded by us for this purpose; on success
    // control does not come back, on failure (empty slot) it falls through.
    unsafe { FILTERS.tail_call(&ctx, FILTER_SLOT) };
    redirect(&ctx, counters, &config)
}

/// Second half, tail-called by the generated filter program after it has set the mask.
#[xdp]
pub fn tapstream_redirect(ctx: XdpContext) -> u32 {
    let Some(counters) = counters(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let config = CONFIG.get(0).copied().unwrap_or_default();
    redirect(&ctx, counters, &config)
}

/// This CPU's counters for the frame's RX queue (queues past the map's end share its last
/// entry).
#[inline(always)]
fn counters(ctx: &XdpContext) -> Option<*mut XdpCounters> {
    COUNTERS.get_ptr_mut(ctx.rx_queue_index().min(MAX_QUEUES - 1))
}

/// The metadata area of the frame, if it holds a whole [`FrameMeta`].
#[inline(always)]
fn meta_ptr(ctx: &XdpContext) -> Option<*mut FrameMeta> {
    let start = ctx.metadata();
    if start + FRAME_META_LEN > ctx.metadata_end() {
        return None;
    }
    Some(start as *mut FrameMeta)
}

#[inline(always)]
fn redirect(ctx: &XdpContext, counters: *mut XdpCounters, config: &XdpConfig) -> u32 {
    let Some(meta) = meta_ptr(ctx) else {
        return unmatched(counters, config);
    };
    // SAFETY: `meta_ptr` checked the bounds.
    let mask = unsafe { (*meta).mask };
    if mask == 0 {
        return unmatched(counters, config);
    }
    // SAFETY: this CPU's slot (see COUNTERS); `meta_ptr` checked the bounds of `meta`.
    unsafe {
        (*counters).matched += 1;
        core::ptr::addr_of_mut!((*meta).rx_tai_ns).write_unaligned(bpf_ktime_get_tai_ns());
    }

    let len = (ctx.data_end() - ctx.data()) as u32;
    if len > config.max_frame_len {
        let cut = (len - config.max_frame_len) as i32;
        // SAFETY: shrinking by less than the frame's length; the metadata is not touched.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx.cast(), -cut) } == 0 {
            // SAFETY: this CPU's slot (see COUNTERS).
            unsafe { (*counters).truncated += 1 };
        }
    }

    match XSKS.redirect(ctx.rx_queue_index(), 0) {
        Ok(action) => {
            // SAFETY: this CPU's slot (see COUNTERS).
            unsafe { (*counters).redirected += 1 };
            action
        }
        Err(_) => {
            // SAFETY: this CPU's slot (see COUNTERS).
            unsafe { (*counters).redirect_errors += 1 };
            verdict(config)
        }
    }
}

/// Counts an unwanted frame and returns what to do with it.
#[inline(always)]
fn unmatched(counters: *mut XdpCounters, config: &XdpConfig) -> u32 {
    let drop = config.unmatched == Unmatched::Drop as u32;
    // SAFETY: this CPU's slot (see COUNTERS).
    unsafe {
        if drop {
            (*counters).dropped += 1;
        } else {
            (*counters).passed += 1;
        }
    }
    verdict(config)
}

#[inline(always)]
fn verdict(config: &XdpConfig) -> u32 {
    if config.unmatched == Unmatched::Drop as u32 { xdp_action::XDP_DROP } else { xdp_action::XDP_PASS }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program that could reach a panic, so this is never called.
    unsafe { core::hint::unreachable_unchecked() }
}

/// Licence of the program; the kernel needs a GPL-compatible one for some helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
