//! The generated XDP filter program: every active capture's filter in one program.
//!
//! The fixed XDP program (`capture-ebpf`) writes a [`capture_common::FrameMeta`] in front of
//! each frame and tail-calls slot [`capture_common::FILTER_SLOT`] of its `FILTERS` program
//! array. The program built here sits in that slot. It runs each capture's filter in turn,
//! sets the capture's bit of a mask when the filter matches (a capture without a filter
//! always has its bit set), stores the mask in the frame's metadata, and tail-calls
//! `tapstream_redirect` through its own one-slot program array `NEXT`, which redirects the
//! frame if any bit is set.
//!
//! aya loads only ELF objects, so the instructions are wrapped in a small in-memory ELF: a
//! program section `xdp` (no multi-buffer, like the fixed program: members of a program array
//! must agree on it), a legacy `maps` section defining `NEXT`, the relocation that points the
//! program at it, and a licence. Loading it runs the kernel verifier; its complaint, if any,
//! is kept in the error.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Ebpf,
    maps::ProgramArray,
    programs::{ProgramFd, Xdp},
};
use capture_common::{FRAME_META_LEN, MAX_CAPTURES};

use super::{
    CbpfProgram, FilterError,
    ebpf::{self, Insn, SCRATCH_BASE, asm::*, op::*},
};
use crate::sys::{self, CapabilityError};

/// Name of the generated program.
const PROGRAM: &str = "tapstream_filter";
/// What failed, in a message naming a missing capability.
const LOAD_STEP: &str = "load the filter program";
/// Name of its program array, whose slot 0 holds `tapstream_redirect`.
const NEXT_MAP: &str = "NEXT";
/// `BPF_MAP_TYPE_PROG_ARRAY`.
const MAP_TYPE_PROG_ARRAY: u32 = 3;
/// `bpf_tail_call`.
const HELPER_TAIL_CALL: i32 = 12;
/// `XDP_PASS`: what the program returns if the tail call fails (empty `NEXT`).
const XDP_PASS: i32 = 2;
/// Offsets of `struct xdp_md`'s fields.
const XDP_MD_DATA: i16 = 0;
const XDP_MD_DATA_END: i16 = 4;
const XDP_MD_DATA_META: i16 = 8;
/// Offset of `FrameMeta::mask` in the metadata.
const META_MASK: i16 = 8;
/// Offset of `FrameMeta::orig_len` in the metadata.
const META_ORIG_LEN: i16 = 16;

/// One capture's part in the program.
#[derive(Clone, Copy, Debug)]
pub struct CaptureFilter<'a> {
    /// The capture's slot: its bit in the mask.
    pub slot: usize,
    /// Its filter; `None` takes every frame.
    pub filter: Option<&'a CbpfProgram>,
}

/// The instructions of a filter program, before wrapping.
#[derive(Clone, Debug)]
pub struct Instructions {
    insns: Vec<Insn>,
    /// Indexes of the 64-bit immediate loads of `NEXT`.
    next_loads: Vec<usize>,
}

impl Instructions {
    /// Builds the program for `captures`.
    pub fn build(captures: &[CaptureFilter<'_>]) -> Result<Self, FilterError> {
        let mut always = 0u64;
        let mut fragments = Vec::new();
        for capture in captures {
            if capture.slot >= MAX_CAPTURES {
                return Err(FilterError::TooManyCaptures { slot: capture.slot });
            }
            match capture.filter {
                None => always |= 1 << capture.slot,
                Some(filter) => {
                    let fragment = ebpf::translate(filter.instructions()).map_err(|source| {
                        FilterError::Translate { expression: filter.expression().to_owned(), source }
                    })?;
                    fragments.push((capture.slot, fragment));
                }
            }
        }
        let scratch = fragments.iter().fold(0u16, |m, (_, f)| m | f.scratch);
        let uses_len = fragments.iter().any(|(_, f)| f.uses_len);

        let mut insns = Vec::new();
        // Prologue: keep the context, the frame's bounds and the mask in registers the
        // filters leave alone; zero the scratch words the filters use.
        insns.push(mov64(CTX, R1));
        insns.push(load(W, DATA, CTX, XDP_MD_DATA));
        insns.push(load(W, DATA_END, CTX, XDP_MD_DATA_END));
        insns.extend(load_imm64(MASK, always));
        for word in 0..16 {
            if scratch & (1 << word) != 0 {
                insns.push(store_imm(W, FP, SCRATCH_BASE + 4 * word, 0));
            }
        }
        if uses_len {
            // The frame's length on the wire, for `len`: the metadata's `orig_len` (the fixed
            // program writes it; a test run gives the length of a record cut short), else the
            // bytes at hand.
            insns.push(mov64(R0, DATA_END));
            insns.push(alu64_reg(SUB, R0, DATA));
            insns.push(store(W, FP, ebpf::WIRE_LEN, R0));
            insns.push(load(W, R4, CTX, XDP_MD_DATA_META));
            insns.push(mov64(R5, R4));
            insns.push(alu64_imm(ADD, R5, FRAME_META_LEN as i32));
            insns.push(jmp_reg(JMP, JGT, R5, DATA, 3));
            insns.push(load(W, R5, R4, META_ORIG_LEN));
            insns.push(jmp_imm(JMP, JEQ, R5, 0, 1));
            insns.push(store(W, FP, ebpf::WIRE_LEN, R5));
        }
        for (slot, fragment) in &fragments {
            fragment.link(&mut insns, *slot as u32);
        }
        // Epilogue: store the mask if the metadata is there (the fixed program made room for
        // it), then go on to the redirect.
        insns.push(load(W, R4, CTX, XDP_MD_DATA_META));
        insns.push(mov64(R5, R4));
        insns.push(alu64_imm(ADD, R5, FRAME_META_LEN as i32));
        insns.push(jmp_reg(JMP, JGT, R5, DATA, 1));
        insns.push(store(DW, R4, META_MASK, MASK));
        insns.push(mov64(R1, CTX));
        let next_load = insns.len();
        insns.extend(load_map(R2));
        insns.push(alu64_imm(MOV, R3, 0));
        insns.push(call(HELPER_TAIL_CALL));
        insns.push(alu64_imm(MOV, R0, XDP_PASS));
        insns.push(exit());
        Ok(Self { insns, next_loads: vec![next_load] })
    }

    /// Number of eBPF instructions.
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    /// Whether there are none (never).
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }

    /// The program wrapped in an ELF object aya can load.
    pub fn to_elf(&self) -> Vec<u8> {
        use object::{
            Architecture, BinaryFormat, Endianness, SectionKind, SymbolKind,
            write::{Object, Relocation},
        };
        let mut obj = Object::new(BinaryFormat::Elf, Architecture::Bpf, Endianness::Little);
        let code: Vec<u8> = self.insns.iter().flat_map(Insn::encode).collect();
        let text = obj.add_section(Vec::new(), b"xdp".to_vec(), SectionKind::Text);
        obj.append_section_data(text, &code, 8);
        obj.add_symbol(global(PROGRAM, code.len(), SymbolKind::Text, text));

        // struct bpf_map_def { type, key_size, value_size, max_entries, map_flags }.
        let mut def = Vec::new();
        for field in [MAP_TYPE_PROG_ARRAY, 4, 4, 1, 0] {
            def.extend_from_slice(&field.to_le_bytes());
        }
        let maps = obj.add_section(Vec::new(), b"maps".to_vec(), SectionKind::Data);
        obj.append_section_data(maps, &def, 4);
        let next = obj.add_symbol(global(NEXT_MAP, def.len(), SymbolKind::Data, maps));
        for &at in &self.next_loads {
            obj.add_relocation(
                text,
                Relocation {
                    offset: (at * 8) as u64,
                    symbol: next,
                    addend: 0,
                    flags: object::RelocationFlags::Elf { r_type: object::elf::R_BPF_64_64 },
                },
            )
            .expect("BPF ELF objects take R_BPF_64_64 relocations");
        }

        let license = obj.add_section(Vec::new(), b"license".to_vec(), SectionKind::Data);
        obj.append_section_data(license, b"Dual MIT/GPL\0", 1);
        obj.write().expect("an ELF object of one section of code and one map is always writable")
    }
}

/// A global symbol of `size` bytes at the start of `section`.
fn global(
    name: &str,
    size: usize,
    kind: object::SymbolKind,
    section: object::write::SectionId,
) -> object::write::Symbol {
    object::write::Symbol {
        name: name.as_bytes().to_vec(),
        value: 0,
        size: size as u64,
        kind,
        scope: object::SymbolScope::Linkage,
        weak: false,
        section: object::write::SymbolSection::Section(section),
        flags: object::SymbolFlags::None,
    }
}

/// A filter program loaded into the kernel (verified; not yet installed).
pub struct LoadedFilter {
    ebpf: Ebpf,
    insns: usize,
}

impl LoadedFilter {
    /// Builds and loads the program for `captures`.
    pub fn load(captures: &[CaptureFilter<'_>]) -> Result<Self, FilterError> {
        let instructions = Instructions::build(captures)?;
        let elf = instructions.to_elf();
        let mut ebpf = Ebpf::load(&elf).map_err(|e| {
            let refused = sys::refused(&e);
            match CapabilityError::check(LOAD_STEP, &sys::BPF_LOAD_CAPABILITIES, refused, e) {
                Ok(missing) => FilterError::Capability(Box::new(missing)),
                Err(e) => FilterError::Load { reason: e.to_string() },
            }
        })?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| FilterError::Load { reason: "the generated object has no XDP program".into() })?;
        program.load().map_err(|e| {
            // The verifier refuses with EACCES when CAP_PERFMON is missing (pointer arithmetic).
            let refused = sys::refused(&e);
            let verifier = FilterError::Verifier { message: verifier_message(&e) };
            match CapabilityError::check(LOAD_STEP, &sys::BPF_LOAD_CAPABILITIES, refused, verifier) {
                Ok(missing) => FilterError::Capability(Box::new(missing)),
                Err(verifier) => verifier,
            }
        })?;
        Ok(Self { ebpf, insns: instructions.len() })
    }

    /// Number of eBPF instructions the program has.
    pub fn instructions(&self) -> usize {
        self.insns
    }

    /// The loaded program.
    pub fn fd(&self) -> Result<&ProgramFd, FilterError> {
        let program: &Xdp = self
            .ebpf
            .program(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| FilterError::Load { reason: "the generated program is gone".into() })?;
        program.fd().map_err(|e| FilterError::Load { reason: e.to_string() })
    }

    /// Points the program's tail call at `next` (the fixed program's `tapstream_redirect`).
    pub fn set_next(&mut self, next: &ProgramFd) -> Result<(), FilterError> {
        let map = self
            .ebpf
            .map_mut(NEXT_MAP)
            .ok_or_else(|| FilterError::Load { reason: "the generated object has no NEXT map".into() })?;
        let mut array =
            ProgramArray::try_from(map).map_err(|e| FilterError::Load { reason: e.to_string() })?;
        array.set(0, next, 0).map_err(|e| FilterError::Load { reason: e.to_string() })
    }

    /// Runs the program on `frame` in the kernel (`BPF_PROG_TEST_RUN`), `repeat` times, and
    /// returns the mask it stored and the mean run time in nanoseconds. Without a `NEXT` set,
    /// the tail call falls through and the program returns `XDP_PASS`.
    pub fn test_run(&self, frame: &[u8], repeat: u32) -> Result<TestRun, FilterError> {
        self.test_run_wire(frame, frame.len() as u32, repeat)
    }

    /// Like [`LoadedFilter::test_run`], for a frame that was `wire_len` bytes long on the wire
    /// of which `frame` holds the first (a record cut short by a snaplen): `len` is the wire
    /// length and loads past `frame` fail, as in libpcap.
    pub fn test_run_wire(&self, frame: &[u8], wire_len: u32, repeat: u32) -> Result<TestRun, FilterError> {
        let fd = self.fd()?.as_fd().as_raw_fd();
        // The metadata the fixed program would have written: zero but the wire length.
        let mut meta = [0u8; FRAME_META_LEN];
        let at = META_ORIG_LEN as usize;
        meta[at..at + 4].copy_from_slice(&wire_len.to_le_bytes());
        crate::sys::xdp_test_run(fd, &meta, frame, repeat)
            .map(|(out, retval, duration_ns)| TestRun {
                mask: out
                    .get(META_MASK as usize..META_MASK as usize + 8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                    .unwrap_or(0),
                retval,
                duration_ns,
            })
            .map_err(|source| FilterError::TestRun { source })
    }
}

/// What one test run of the program gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TestRun {
    /// The mask of captures that want the frame.
    pub mask: u64,
    /// The program's return value.
    pub retval: u32,
    /// Mean time of one run, in nanoseconds, as the kernel measured it.
    pub duration_ns: u32,
}

/// The verifier's complaint, shortened to what a user can act on: its last lines (where it
/// names the instruction and the reason), with the error.
fn verifier_message(error: &aya::programs::ProgramError) -> String {
    match error {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
            let tail = lines[lines.len().saturating_sub(4)..].join(" | ");
            format!("{io_error}: {tail}")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::pcap::BpfInsn;

    /// A 64-byte frame whose byte i is i (an IPv4 version/IHL of 0x0e at offset 14).
    fn frame() -> Vec<u8> {
        (0..64).collect()
    }

    fn kernel_matches(filter: &CbpfProgram, frame: &[u8]) -> bool {
        let program = LoadedFilter::load(&[CaptureFilter { slot: 0, filter: Some(filter) }])
            .unwrap_or_else(|e| panic!("{}: {e:#}", filter.expression()));
        let run = program.test_run(frame, 1).unwrap();
        assert_eq!(run.retval, XDP_PASS as u32, "the tail call falls through with NEXT empty");
        run.mask & 1 != 0
    }

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> BpfInsn {
        BpfInsn { code, jt, jf, k }
    }

    const RET_A: BpfInsn = BpfInsn { code: 0x16, jt: 0, jf: 0, k: 0 };
    const RET_1: BpfInsn = BpfInsn { code: 0x06, jt: 0, jf: 0, k: 1 };
    const RET_0: BpfInsn = BpfInsn { code: 0x06, jt: 0, jf: 0, k: 0 };

    /// Each case: a name and a classic program; the kernel's verdict on the test frame (and on
    /// a shorter and a longer one) must be libpcap's.
    fn edge_cases() -> Vec<(&'static str, Vec<BpfInsn>)> {
        let ld_imm = |k| insn(0x00, 0, 0, k);
        let ldx_imm = |k| insn(0x01, 0, 0, k);
        vec![
            ("div by X = 0 returns 0", vec![ldx_imm(0), ld_imm(10), insn(0x3c, 0, 0, 0), RET_1]),
            ("div by X = 3", vec![ldx_imm(3), ld_imm(10), insn(0x3c, 0, 0, 0), RET_A]),
            ("mod by X = 0 returns 0", vec![ldx_imm(0), ld_imm(10), insn(0x9c, 0, 0, 0), RET_1]),
            ("mod by X = 5 is 0", vec![ldx_imm(5), ld_imm(10), insn(0x9c, 0, 0, 0), RET_A]),
            ("lsh by X = 32", vec![ld_imm(1), ldx_imm(32), insn(0x6c, 0, 0, 0), RET_A]),
            ("lsh by X = 33", vec![ld_imm(1), ldx_imm(33), insn(0x6c, 0, 0, 0), RET_A]),
            ("rsh by X = 32", vec![ld_imm(0x8000_0000), ldx_imm(32), insn(0x7c, 0, 0, 0), RET_A]),
            ("lsh by X = 31", vec![ld_imm(1), ldx_imm(31), insn(0x6c, 0, 0, 0), RET_A]),
            ("rsh by k = 31", vec![ld_imm(0x8000_0000), insn(0x74, 0, 0, 31), RET_A]),
            ("unsigned jgt", vec![ld_imm(0x8000_0000), insn(0x25, 0, 1, 1), RET_1, RET_0]),
            ("unsigned jge by X", vec![ld_imm(0xffff_fff0), ldx_imm(5), insn(0x3d, 0, 1, 0), RET_1, RET_0]),
            ("jeq 0xffffffff", vec![ld_imm(0xffff_ffff), insn(0x15, 0, 1, 0xffff_ffff), RET_1, RET_0]),
            ("jset high bit", vec![ld_imm(0x8000_0001), insn(0x45, 0, 1, 0x8000_0000), RET_1, RET_0]),
            (
                "32-bit add wraps",
                vec![ld_imm(0xffff_ffff), insn(0x04, 0, 0, 1), insn(0x15, 0, 1, 0), RET_1, RET_0],
            ),
            ("32-bit mul wraps", vec![ld_imm(0x1_0001), insn(0x24, 0, 0, 0x1_0000), RET_A]),
            (
                "sub below zero",
                vec![ld_imm(1), insn(0x14, 0, 0, 2), insn(0x15, 0, 1, 0xffff_ffff), RET_1, RET_0],
            ),
            ("neg", vec![ld_imm(1), insn(0x84, 0, 0, 0), insn(0x15, 0, 1, 0xffff_ffff), RET_1, RET_0]),
            (
                "and, or, xor",
                vec![
                    ld_imm(0xf0f0),
                    insn(0x54, 0, 0, 0xff),
                    insn(0x44, 0, 0, 0x100),
                    insn(0xa4, 0, 0, 0x1f0),
                    RET_A,
                ],
            ),
            ("tax, txa", vec![ld_imm(7), insn(0x07, 0, 0, 0), ld_imm(0), insn(0x87, 0, 0, 0), RET_A]),
            ("ld word", vec![insn(0x20, 0, 0, 12), insn(0x15, 0, 1, 0x0c0d_0e0f), RET_1, RET_0]),
            ("ld half", vec![insn(0x28, 0, 0, 12), insn(0x15, 0, 1, 0x0c0d), RET_1, RET_0]),
            ("ld byte", vec![insn(0x30, 0, 0, 63), RET_A]),
            ("ld byte at the end", vec![insn(0x30, 0, 0, 64), RET_1]),
            ("ld word across the end", vec![insn(0x20, 0, 0, 61), RET_1]),
            ("ld word ending at the end", vec![insn(0x20, 0, 0, 60), RET_1]),
            ("ld far beyond any frame", vec![insn(0x20, 0, 0, 0x10_0000), RET_1]),
            ("ld ind", vec![ldx_imm(10), insn(0x48, 0, 0, 2), insn(0x15, 0, 1, 0x0c0d), RET_1, RET_0]),
            ("ld ind past the end", vec![ldx_imm(60), insn(0x50, 0, 0, 4), RET_1]),
            ("ld ind with a huge X", vec![ldx_imm(0xffff_fff0), insn(0x50, 0, 0, 0x20), RET_1]),
            ("msh", vec![insn(0xb1, 0, 0, 14), insn(0x87, 0, 0, 0), RET_A]),
            ("msh past the end", vec![insn(0xb1, 0, 0, 64), RET_1]),
            ("len", vec![insn(0x80, 0, 0, 0), insn(0x35, 0, 1, 64), RET_1, RET_0]),
            ("ldx len", vec![insn(0x81, 0, 0, 0), insn(0x87, 0, 0, 0), RET_A]),
            (
                "scratch memory",
                vec![
                    ld_imm(5),
                    insn(0x02, 0, 0, 3),
                    ld_imm(0),
                    insn(0x61, 0, 0, 3),
                    insn(0x87, 0, 0, 0),
                    RET_A,
                ],
            ),
            ("scratch M[15] via stx", vec![ldx_imm(9), insn(0x03, 0, 0, 15), insn(0x60, 0, 0, 15), RET_A]),
            ("ret 0", vec![RET_0]),
            ("ret A = 0", vec![RET_A]),
            ("ja over code", vec![insn(0x05, 0, 0, 1), RET_0, RET_1]),
            ("both branches the same", vec![ld_imm(1), insn(0x15, 1, 1, 1), RET_0, RET_1]),
            ("unreachable code between", vec![ld_imm(2), insn(0x15, 2, 3, 2), RET_0, RET_0, RET_1, RET_0]),
        ]
    }

    #[test]
    fn translated_edge_cases_agree_with_libpcaps_interpreter() {
        let full = frame();
        let (mut matched, mut checked) = (0, 0);
        for (name, insns) in edge_cases() {
            let filter = CbpfProgram::from_instructions(name, insns);
            for len in [14, 40, 64] {
                let f = &full[..len];
                let kernel = kernel_matches(&filter, f);
                matched += usize::from(kernel);
                assert_eq!(
                    kernel,
                    filter.matches(f, len as u32),
                    "{name} on a {len}-byte frame:\n{}",
                    filter.dump()
                );
                checked += 1;
            }
        }
        assert_eq!(checked, edge_cases().len() * 3);
        // The cases are not all one verdict (a program that never matched would pass them).
        assert!(matched > checked / 3 && matched < checked * 2 / 3, "{matched} of {checked} matched");
    }

    #[test]
    fn every_capture_gets_its_own_bit() {
        let tcp = CbpfProgram::compile("tcp").unwrap();
        let arp = CbpfProgram::compile("arp").unwrap();
        let program = LoadedFilter::load(&[
            CaptureFilter { slot: 0, filter: Some(&tcp) },
            CaptureFilter { slot: 5, filter: None },
            CaptureFilter { slot: 40, filter: Some(&arp) },
            CaptureFilter { slot: 63, filter: Some(&arp) },
        ])
        .unwrap();
        let mut arp_frame = vec![0xff; 12];
        arp_frame.extend_from_slice(&[0x08, 0x06]);
        arp_frame.resize(60, 0);
        assert_eq!(program.test_run(&arp_frame, 1).unwrap().mask, 1 << 5 | 1 << 40 | 1 << 63);
        let no_filter = LoadedFilter::load(&[CaptureFilter { slot: 3, filter: None }]).unwrap();
        assert_eq!(no_filter.test_run(&arp_frame, 1).unwrap().mask, 1 << 3);
    }

    #[test]
    fn sixty_four_filtered_captures_load() {
        let filters: Vec<CbpfProgram> = (0..MAX_CAPTURES)
            .map(|i| {
                CbpfProgram::compile(&format!("tcp port {} or udp port {}", 1000 + i, 2000 + i)).unwrap()
            })
            .collect();
        let captures: Vec<CaptureFilter<'_>> =
            filters.iter().enumerate().map(|(slot, f)| CaptureFilter { slot, filter: Some(f) }).collect();
        let program = LoadedFilter::load(&captures).unwrap();
        assert!(program.instructions() > 64 * 10);
        let err = Instructions::build(&[CaptureFilter { slot: MAX_CAPTURES, filter: None }]).unwrap_err();
        assert!(err.to_string().contains("64"), "{err}");
    }
}
