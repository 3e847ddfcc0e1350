//! tapstream's XDP program.
//!
//! Attached to a capture interface, it sees every received frame before the kernel stack does.
//! Minimum kernel: 5.9 (bpf_link for XDP); tested on 6.18.
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::map, macros::xdp, maps::PerCpuArray, programs::XdpContext};
use capture_common::XdpCounters;

/// Frame counters, one slot per CPU (no atomics needed on the hot path).
#[map]
static COUNTERS: PerCpuArray<XdpCounters> = PerCpuArray::with_max_entries(1, 0);

/// Entry point attached to the interface.
#[xdp]
pub fn tapstream_xdp(ctx: XdpContext) -> u32 {
    try_tapstream_xdp(&ctx)
}

#[inline(always)]
fn try_tapstream_xdp(_ctx: &XdpContext) -> u32 {
    if let Some(counters) = COUNTERS.get_ptr_mut(0) {
        // SAFETY: the map lookup returned this CPU's slot, which only this CPU writes while the
        // program runs (XDP runs with preemption disabled).
        unsafe {
            (*counters).seen += 1;
            (*counters).passed += 1;
        }
    }
    xdp_action::XDP_PASS
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
