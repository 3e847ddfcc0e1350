//! Classic BPF to eBPF, with libpcap's semantics.
//!
//! A filter becomes a fragment of the XDP filter program ([`super::program`]): it reads the
//! frame through two registers the program's prologue sets (the frame's start and end), and
//! ends by jumping to "match" or "no match". The translation keeps what libpcap's interpreter
//! (`bpf_filter`) does, where a naive one would not:
//!
//! - `A` and `X` are 32-bit and unsigned: ALU32 operations (which zero the upper half) and
//!   JMP32 compares, whose immediates are taken as 32-bit patterns, never sign-extended.
//! - Every packet load is checked against the frame's end first; a load past it makes the
//!   filter return 0 (no match), as libpcap does. The checks have the shape the kernel
//!   verifier tracks (pointer plus constant, or plus a bounded variable, compared with the
//!   end), so it accepts the loads.
//! - Division and modulo by a zero `X` return 0; shifts by an `X` of 32 or more give 0.
//! - `M[]` lives on the stack; the program zeroes the words filters use, since the verifier
//!   refuses reads of memory never written.
//! - Code no path reaches is left out: the verifier refuses unreachable instructions.
//! - libpcap's only loop (`protochain`, which walks IPv6 extension headers and IPv4/IPv6 AH
//!   with a backward `ja`) is unrolled: the program is laid out [`LOOP_PASSES`] + 1 times,
//!   each backward jump going forward to its target in the next copy, so the kernel sees
//!   only forward jumps. A frame that would take the loop more than [`LOOP_PASSES`] times (a
//!   chain of more headers than that) does not match; libpcap walks on (and, on a header
//!   chain that leads back to itself, never ends).
//! - What the kernel cannot run is refused with a reason: Linux extension loads
//!   (`SKF_AD_*`), shifts by a constant of 32 or more.

use super::pcap::BpfInsn;

/// How many times a filter may take a backward jump (go round `protochain`'s loop, one
/// extension header each), in all its loops together, before the frame is taken as not
/// matching. Real chains are a few
/// headers long; the kernel's verifier and the program's size bound it.
pub const LOOP_PASSES: usize = 32;

/// Most eBPF instructions one filter may become. libpcap's own limit is 4096 classic
/// instructions; real expressions are far smaller (a 500-host `or` is about 3000).
pub const MAX_FILTER_INSNS: usize = 16_384;

/// Frames reach the XDP program in one buffer of at most a page; a load at or beyond this
/// offset can never succeed, so it is translated as "no match".
const MAX_LOAD_END: u32 = 32_767;

/// Errors translating a classic BPF program.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("instruction {pc} ({code:#06x}) is not supported in XDP: {reason}")]
    Unsupported { pc: usize, code: u16, reason: &'static str },
    #[error("instruction {pc} jumps outside the program")]
    JumpOutOfRange { pc: usize },
    /// Never after unrolling (an internal check).
    #[error("instruction {pc} jumps backwards")]
    BackwardJump { pc: usize },
    #[error("the program runs past its last instruction")]
    FallsOffEnd,
    #[error("the filter needs {insns} eBPF instructions, more than the {MAX_FILTER_INSNS} allowed")]
    TooLarge { insns: usize },
    #[error("the program is empty")]
    Empty,
}

/// One eBPF instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// The instruction's 8 bytes, little-endian.
    pub fn encode(&self) -> [u8; 8] {
        let mut out = [0; 8];
        out[0] = self.code;
        out[1] = (self.src << 4) | (self.dst & 0x0f);
        out[2..4].copy_from_slice(&self.off.to_le_bytes());
        out[4..8].copy_from_slice(&self.imm.to_le_bytes());
        out
    }

    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Self {
        Self { code, dst, src, off, imm }
    }
}

/// eBPF opcodes and registers, as the kernel's `linux/bpf.h` defines them.
pub mod op {
    pub const LD: u8 = 0x00;
    pub const LDX: u8 = 0x01;
    pub const ST: u8 = 0x02;
    pub const STX: u8 = 0x03;
    pub const ALU: u8 = 0x04;
    pub const JMP: u8 = 0x05;
    pub const JMP32: u8 = 0x06;
    pub const ALU64: u8 = 0x07;

    pub const W: u8 = 0x00;
    pub const H: u8 = 0x08;
    pub const B: u8 = 0x10;
    pub const DW: u8 = 0x18;
    pub const IMM: u8 = 0x00;
    pub const MEM: u8 = 0x60;

    pub const K: u8 = 0x00;
    pub const X: u8 = 0x08;

    pub const ADD: u8 = 0x00;
    pub const SUB: u8 = 0x10;
    pub const MUL: u8 = 0x20;
    pub const DIV: u8 = 0x30;
    pub const OR: u8 = 0x40;
    pub const AND: u8 = 0x50;
    pub const LSH: u8 = 0x60;
    pub const RSH: u8 = 0x70;
    pub const NEG: u8 = 0x80;
    pub const MOD: u8 = 0x90;
    pub const XOR: u8 = 0xa0;
    pub const MOV: u8 = 0xb0;
    /// Byte swap; with [`X`] (`BPF_TO_BE`): to big-endian, a swap on this little-endian
    /// target.
    pub const END: u8 = 0xd0;

    pub const JA: u8 = 0x00;
    pub const JEQ: u8 = 0x10;
    pub const JGT: u8 = 0x20;
    pub const JGE: u8 = 0x30;
    pub const JSET: u8 = 0x40;
    pub const JNE: u8 = 0x50;
    pub const CALL: u8 = 0x80;
    pub const EXIT: u8 = 0x90;
    pub const JLT: u8 = 0xa0;
    pub const JLE: u8 = 0xb0;

    /// `src` of a 64-bit immediate load whose `imm` is a map (relocated by the loader).
    pub const PSEUDO_MAP_FD: u8 = 1;

    /// Return value, and scratch.
    pub const R0: u8 = 0;
    pub const R1: u8 = 1;
    pub const R2: u8 = 2;
    pub const R3: u8 = 3;
    /// The classic `A`.
    pub const RA: u8 = 2;
    /// The classic `X`.
    pub const RX: u8 = 3;
    pub const R4: u8 = 4;
    pub const R5: u8 = 5;
    /// The program's context (`struct xdp_md *`).
    pub const CTX: u8 = 6;
    /// Start of the frame.
    pub const DATA: u8 = 7;
    /// End of the frame.
    pub const DATA_END: u8 = 8;
    /// The capture mask being built.
    pub const MASK: u8 = 9;
    /// Frame pointer.
    pub const FP: u8 = 10;
}

use op::*;

/// Builders for the instructions the translator and the program use.
pub mod asm {
    use super::{Insn, op::*};

    pub const fn alu32_imm(op: u8, dst: u8, imm: i32) -> Insn {
        Insn::new(ALU | op | K, dst, 0, 0, imm)
    }
    pub const fn alu32_reg(op: u8, dst: u8, src: u8) -> Insn {
        Insn::new(ALU | op | X, dst, src, 0, 0)
    }
    pub const fn alu64_imm(op: u8, dst: u8, imm: i32) -> Insn {
        Insn::new(ALU64 | op | K, dst, 0, 0, imm)
    }
    pub const fn alu64_reg(op: u8, dst: u8, src: u8) -> Insn {
        Insn::new(ALU64 | op | X, dst, src, 0, 0)
    }
    pub const fn mov64(dst: u8, src: u8) -> Insn {
        alu64_reg(MOV, dst, src)
    }
    /// `dst = *(size *)(src + off)`.
    pub const fn load(size: u8, dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(LDX | MEM | size, dst, src, off, 0)
    }
    /// `*(size *)(dst + off) = src`.
    pub const fn store(size: u8, dst: u8, off: i16, src: u8) -> Insn {
        Insn::new(STX | MEM | size, dst, src, off, 0)
    }
    /// `*(size *)(dst + off) = imm`.
    pub const fn store_imm(size: u8, dst: u8, off: i16, imm: i32) -> Insn {
        Insn::new(ST | MEM | size, dst, 0, off, imm)
    }
    /// The two halves of `dst = imm` for a 64-bit immediate.
    pub const fn load_imm64(dst: u8, imm: u64) -> [Insn; 2] {
        [
            Insn::new(LD | DW | IMM, dst, 0, 0, imm as u32 as i32),
            Insn::new(0, 0, 0, 0, (imm >> 32) as u32 as i32),
        ]
    }
    /// The two halves of `dst = &map`; the loader relocates the map.
    pub const fn load_map(dst: u8) -> [Insn; 2] {
        [Insn::new(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, 0), Insn::new(0, 0, 0, 0, 0)]
    }
    pub const fn jmp_imm(class: u8, op: u8, dst: u8, imm: i32, off: i16) -> Insn {
        Insn::new(class | op | K, dst, 0, off, imm)
    }
    pub const fn jmp_reg(class: u8, op: u8, dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(class | op | X, dst, src, off, 0)
    }
    pub const fn ja(off: i16) -> Insn {
        Insn::new(JMP | JA, 0, 0, off, 0)
    }
    pub const fn call(helper: i32) -> Insn {
        Insn::new(JMP | CALL, 0, 0, 0, helper)
    }
    pub const fn exit() -> Insn {
        Insn::new(JMP | EXIT, 0, 0, 0, 0)
    }
}

use asm::*;

/// Where a jump of a fragment goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// The translation of classic instruction `n`.
    Cbpf(usize),
    /// The filter matched.
    Match,
    /// The filter did not match.
    NoMatch,
}

/// A translated filter: eBPF instructions that end by jumping to [`Fragment::link`]'s
/// "match" or "no match" positions.
#[derive(Clone, Debug)]
pub struct Fragment {
    insns: Vec<Insn>,
    /// Indexes of jump instructions and where they go (resolved by `link`).
    jumps: Vec<(usize, Target)>,
    /// Words of `M[]` the filter uses (bit i = `M[i]`).
    pub scratch: u16,
    /// Whether it reads the frame's length (`len`, `greater`, `less`), which the program
    /// keeps at [`WIRE_LEN`].
    pub uses_len: bool,
}

/// Bytes below the frame pointer where the program keeps the frame's length on the wire (a
/// 32-bit word), which `len` reads: libpcap's `len` is the wire length, not the bytes at hand.
pub const WIRE_LEN: i16 = SCRATCH_BASE - 8;

/// Bytes below the frame pointer where `M[0]` is stored (`M[i]` is 4 bytes above).
pub const SCRATCH_BASE: i16 = -64;

/// Classic BPF's number of scratch words.
const MEMWORDS: u32 = 16;

const SKF_AD_OFF: u32 = 0xffff_f000;

// Classic BPF opcode fields (`pcap/bpf.h`).
mod cbpf {
    pub const LD: u16 = 0x00;
    pub const LDX: u16 = 0x01;
    pub const ST: u16 = 0x02;
    pub const STX: u16 = 0x03;
    pub const ALU: u16 = 0x04;
    pub const JMP: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const MISC: u16 = 0x07;

    pub const W: u16 = 0x00;
    pub const H: u16 = 0x08;
    pub const B: u16 = 0x10;

    pub const IMM: u16 = 0x00;
    pub const ABS: u16 = 0x20;
    pub const IND: u16 = 0x40;
    pub const MEM: u16 = 0x60;
    pub const LEN: u16 = 0x80;
    pub const MSH: u16 = 0xa0;

    pub const X: u16 = 0x08;
    pub const A: u16 = 0x10;

    pub const TAX: u16 = 0x00;
    pub const TXA: u16 = 0x80;

    pub fn class(code: u16) -> u16 {
        code & 0x07
    }
    pub fn size(code: u16) -> u16 {
        code & 0x18
    }
    pub fn mode(code: u16) -> u16 {
        code & 0xe0
    }
    pub fn op(code: u16) -> u16 {
        code & 0xf0
    }
    pub fn src(code: u16) -> u16 {
        code & 0x08
    }
    pub fn rval(code: u16) -> u16 {
        code & 0x18
    }
    pub fn miscop(code: u16) -> u16 {
        code & 0xf8
    }
}

/// Bytes a classic load of `size` reads.
fn load_len(size: u16) -> Option<u32> {
    match size {
        cbpf::W => Some(4),
        cbpf::H => Some(2),
        cbpf::B => Some(1),
        _ => None,
    }
}

fn ebpf_size(len: u32) -> u8 {
    match len {
        4 => W,
        2 => H,
        _ => B,
    }
}

/// Whether a packet load can never succeed (its end is past any frame XDP sees), so that it
/// always ends the filter with "no match".
fn load_is_impossible(insn: &BpfInsn) -> bool {
    let len = load_len(cbpf::size(insn.code)).unwrap_or(1);
    insn.k.checked_add(len).is_none_or(|end| end > MAX_LOAD_END)
}

/// The classic instructions control can go to after `pc`; `Ok(None)` for a return.
fn successors(prog: &[BpfInsn], pc: usize) -> Result<Vec<usize>, TranslateError> {
    let insn = &prog[pc];
    let jump = |off: u64| -> Result<usize, TranslateError> {
        let to = pc as u64 + 1 + off;
        if to >= prog.len() as u64 { Err(TranslateError::JumpOutOfRange { pc }) } else { Ok(to as usize) }
    };
    let next = || if pc + 1 < prog.len() { Ok(pc + 1) } else { Err(TranslateError::FallsOffEnd) };
    match cbpf::class(insn.code) {
        cbpf::RET => Ok(Vec::new()),
        cbpf::JMP if cbpf::op(insn.code) == 0 => {
            // `ja k`: a k that makes the target wrap around is a backward jump.
            if insn.k > i32::MAX as u32 {
                return Err(TranslateError::BackwardJump { pc });
            }
            Ok(vec![jump(u64::from(insn.k))?])
        }
        cbpf::JMP => Ok(vec![jump(u64::from(insn.jt))?, jump(u64::from(insn.jf))?]),
        cbpf::LD | cbpf::LDX
            if matches!(cbpf::mode(insn.code), cbpf::ABS | cbpf::IND | cbpf::MSH)
                && insn.k < SKF_AD_OFF
                && load_is_impossible(insn) =>
        {
            Ok(Vec::new())
        }
        _ => Ok(vec![next()?]),
    }
}

/// Which classic instructions some path from the first reaches.
fn reachable(prog: &[BpfInsn]) -> Result<Vec<bool>, TranslateError> {
    let mut seen = vec![false; prog.len()];
    seen[0] = true;
    // Jumps only go forward, so one pass in order visits every reachable instruction after
    // all of its predecessors.
    for pc in 0..prog.len() {
        if !seen[pc] {
            continue;
        }
        for to in successors(prog, pc)? {
            seen[to] = true;
        }
    }
    Ok(seen)
}

struct Translator<'a> {
    prog: &'a [BpfInsn],
    out: Vec<Insn>,
    jumps: Vec<(usize, Target)>,
    scratch: u16,
    uses_len: bool,
}

impl Translator<'_> {
    fn emit(&mut self, insn: Insn) {
        self.out.push(insn);
    }

    fn jump(&mut self, insn: Insn, target: Target) {
        self.jumps.push((self.out.len(), target));
        self.out.push(insn);
    }

    /// The next classic instruction that will be translated after `pc` (where a
    /// fall-through lands).
    fn next_emitted(reach: &[bool], pc: usize) -> Option<usize> {
        (pc + 1..reach.len()).find(|&i| reach[i])
    }

    fn unsupported(&self, pc: usize, reason: &'static str) -> TranslateError {
        TranslateError::Unsupported { pc, code: self.prog[pc].code, reason }
    }

    /// `dst = P[k:len]` in host order, or "no match" if the frame is shorter.
    fn load_abs(&mut self, dst: u8, k: u32, len: u32) {
        // Not impossible (see `successors`), so `k + len` fits the 16-bit offset.
        self.emit(mov64(R0, DATA));
        self.emit(alu64_imm(ADD, R0, (k + len) as i32));
        self.jump(jmp_reg(JMP, JGT, R0, DATA_END, 0), Target::NoMatch);
        self.emit(load(ebpf_size(len), dst, DATA, k as i16));
        self.swap(dst, len);
    }

    /// `A = P[X + k:len]` in host order, or "no match" if the frame is shorter.
    fn load_ind(&mut self, k: u32, len: u32) {
        // X is at most 2^32 - 1 and k below MAX_LOAD_END, so the 64-bit sum does not wrap; it
        // is bounded before it is added to the frame pointer, as the verifier wants.
        self.emit(mov64(R0, RX));
        self.emit(alu64_imm(ADD, R0, k as i32));
        self.jump(jmp_imm(JMP, JGT, R0, (MAX_LOAD_END - len) as i32, 0), Target::NoMatch);
        self.emit(mov64(R1, DATA));
        self.emit(alu64_reg(ADD, R1, R0));
        self.emit(mov64(R0, R1));
        self.emit(alu64_imm(ADD, R0, len as i32));
        self.jump(jmp_reg(JMP, JGT, R0, DATA_END, 0), Target::NoMatch);
        self.emit(load(ebpf_size(len), RA, R1, 0));
        self.swap(RA, len);
    }

    /// Network to host order.
    fn swap(&mut self, reg: u8, len: u32) {
        if len > 1 {
            self.emit(Insn::new(ALU | END | X, reg, 0, 0, (len * 8) as i32));
        }
    }

    fn translate(&mut self, reach: &[bool], map: &mut [usize]) -> Result<(), TranslateError> {
        // A and X start at zero.
        self.emit(alu32_imm(MOV, RA, 0));
        self.emit(alu32_imm(MOV, RX, 0));
        for pc in 0..self.prog.len() {
            if !reach[pc] {
                continue;
            }
            map[pc] = self.out.len();
            let insn = self.prog[pc];
            let code = insn.code;
            let k = insn.k;
            match cbpf::class(code) {
                cbpf::LD | cbpf::LDX => {
                    let dst = if cbpf::class(code) == cbpf::LD { RA } else { RX };
                    let mode = cbpf::mode(code);
                    if matches!(mode, cbpf::ABS | cbpf::IND | cbpf::MSH) && k >= SKF_AD_OFF {
                        return Err(
                            self.unsupported(pc, "Linux extension loads (SKF_AD_*) exist only for sockets")
                        );
                    }
                    let len = load_len(cbpf::size(code));
                    match (cbpf::class(code), mode) {
                        (_, cbpf::IMM) => self.emit(alu32_imm(MOV, dst, k as i32)),
                        (_, cbpf::LEN) => {
                            // The frame's length on the wire, as the program's prologue found it.
                            self.uses_len = true;
                            self.emit(load(W, dst, FP, WIRE_LEN));
                        }
                        (_, cbpf::MEM) => {
                            let off = self.scratch_slot(pc, k)?;
                            self.emit(load(W, dst, FP, off));
                        }
                        (cbpf::LD, cbpf::ABS) | (cbpf::LD, cbpf::IND) => {
                            let Some(len) = len else { return Err(self.unsupported(pc, "bad load size")) };
                            if load_is_impossible(&insn) {
                                self.jump(ja(0), Target::NoMatch);
                            } else if mode == cbpf::ABS {
                                self.load_abs(RA, k, len);
                            } else {
                                self.load_ind(k, len);
                            }
                        }
                        (cbpf::LDX, cbpf::MSH) => {
                            if load_is_impossible(&insn) {
                                self.jump(ja(0), Target::NoMatch);
                            } else {
                                // X = 4 * (P[k] & 0xf): an IPv4 header's length.
                                self.load_abs(RX, k, 1);
                                self.emit(alu32_imm(AND, RX, 0xf));
                                self.emit(alu32_imm(LSH, RX, 2));
                            }
                        }
                        _ => return Err(self.unsupported(pc, "unknown load mode")),
                    }
                }
                cbpf::ST | cbpf::STX => {
                    let src = if cbpf::class(code) == cbpf::ST { RA } else { RX };
                    let off = self.scratch_slot(pc, k)?;
                    self.emit(store(W, FP, off, src));
                }
                cbpf::ALU => self.alu(pc, insn)?,
                cbpf::JMP => self.jmp(pc, insn, reach)?,
                cbpf::RET => match cbpf::rval(code) {
                    0 => self.jump(ja(0), if k != 0 { Target::Match } else { Target::NoMatch }),
                    cbpf::A => {
                        self.jump(jmp_imm(JMP32, JNE, RA, 0, 0), Target::Match);
                        self.jump(ja(0), Target::NoMatch);
                    }
                    _ => return Err(self.unsupported(pc, "return of X")),
                },
                cbpf::MISC => match cbpf::miscop(code) {
                    cbpf::TAX => self.emit(alu32_reg(MOV, RX, RA)),
                    cbpf::TXA => self.emit(alu32_reg(MOV, RA, RX)),
                    _ => return Err(self.unsupported(pc, "unknown misc operation")),
                },
                _ => return Err(self.unsupported(pc, "unknown instruction class")),
            }
        }
        Ok(())
    }

    fn scratch_slot(&mut self, pc: usize, k: u32) -> Result<i16, TranslateError> {
        if k >= MEMWORDS {
            return Err(self.unsupported(pc, "scratch memory index beyond M[15]"));
        }
        self.scratch |= 1 << k;
        Ok(SCRATCH_BASE + 4 * k as i16)
    }

    fn alu(&mut self, pc: usize, insn: BpfInsn) -> Result<(), TranslateError> {
        let code = insn.code;
        let op = cbpf::op(code) as u8;
        let by_x = cbpf::src(code) == cbpf::X;
        match op {
            NEG => self.emit(Insn::new(ALU | NEG, RA, 0, 0, 0)),
            ADD | SUB | MUL | OR | AND | XOR => {
                self.emit(if by_x { alu32_reg(op, RA, RX) } else { alu32_imm(op, RA, insn.k as i32) })
            }
            DIV | MOD => {
                if by_x {
                    // libpcap: division by zero makes the filter return 0.
                    self.jump(jmp_imm(JMP32, JEQ, RX, 0, 0), Target::NoMatch);
                    self.emit(alu32_reg(op, RA, RX));
                } else if insn.k == 0 {
                    return Err(self.unsupported(pc, "division by a constant zero"));
                } else {
                    self.emit(alu32_imm(op, RA, insn.k as i32));
                }
            }
            LSH | RSH => {
                if by_x {
                    // libpcap: a shift by 32 or more gives 0 (eBPF would mask the count).
                    self.emit(jmp_imm(JMP32, JGT, RX, 31, 2));
                    self.emit(alu32_reg(op, RA, RX));
                    self.emit(ja(1));
                    self.emit(alu32_imm(MOV, RA, 0));
                } else if insn.k >= 32 {
                    return Err(self.unsupported(pc, "shift by a constant of 32 or more"));
                } else {
                    self.emit(alu32_imm(op, RA, insn.k as i32));
                }
            }
            _ => return Err(self.unsupported(pc, "unknown ALU operation")),
        }
        Ok(())
    }

    fn jmp(&mut self, pc: usize, insn: BpfInsn, reach: &[bool]) -> Result<(), TranslateError> {
        let code = insn.code;
        let op = cbpf::op(code) as u8;
        let next = Self::next_emitted(reach, pc);
        if op == JA {
            let to = pc + 1 + insn.k as usize;
            if next != Some(to) {
                self.jump(ja(0), Target::Cbpf(to));
            }
            return Ok(());
        }
        if !matches!(op, JEQ | JGT | JGE | JSET) {
            return Err(self.unsupported(pc, "unknown jump"));
        }
        let jt = pc + 1 + usize::from(insn.jt);
        let jf = pc + 1 + usize::from(insn.jf);
        if jt == jf {
            if next != Some(jt) {
                self.jump(ja(0), Target::Cbpf(jt));
            }
            return Ok(());
        }
        let by_x = cbpf::src(code) == cbpf::X;
        let cond = |op: u8| {
            if by_x { jmp_reg(JMP32, op, RA, RX, 0) } else { jmp_imm(JMP32, op, RA, insn.k as i32, 0) }
        };
        // Where the true branch is the fall-through, test the opposite condition (JSET has
        // none, so it keeps its two jumps).
        let inverse = match op {
            JEQ => Some(JNE),
            JGT => Some(JLE),
            JGE => Some(JLT),
            _ => None,
        };
        match inverse {
            Some(inv) if next == Some(jt) => self.jump(cond(inv), Target::Cbpf(jf)),
            _ => {
                self.jump(cond(op), Target::Cbpf(jt));
                if next != Some(jf) {
                    self.jump(ja(0), Target::Cbpf(jf));
                }
            }
        }
        Ok(())
    }
}

/// The target of `ja k` at `pc` if it jumps backwards (`k` wraps around), `Ok(None)` if not.
fn backward_target(pc: usize, insn: &BpfInsn) -> Result<Option<usize>, TranslateError> {
    if cbpf::class(insn.code) != cbpf::JMP || cbpf::op(insn.code) != 0 || insn.k <= i32::MAX as u32 {
        return Ok(None);
    }
    let to = pc as i64 + 1 + i64::from(insn.k) - (1i64 << 32);
    if to < 0 { Err(TranslateError::JumpOutOfRange { pc }) } else { Ok(Some(to as usize)) }
}

/// `prog` with its loops unrolled ([`LOOP_PASSES`]): copies of it one after the other, each
/// backward jump going forward to its target in the next copy, and from the last copy to a
/// final `ret #0`. `None` if it has no backward jump.
fn unroll(prog: &[BpfInsn]) -> Result<Option<Vec<BpfInsn>>, TranslateError> {
    let mut backward = Vec::new();
    for (pc, insn) in prog.iter().enumerate() {
        if let Some(to) = backward_target(pc, insn)? {
            backward.push((pc, to));
        }
    }
    if backward.is_empty() {
        return Ok(None);
    }
    let len = prog.len();
    let copies = LOOP_PASSES + 1;
    let mut out = Vec::with_capacity(copies * len + 1);
    for copy in 0..copies {
        out.extend_from_slice(prog);
        for &(pc, to) in &backward {
            let at = copy * len + pc;
            // The next copy's `to`, or past the last copy: the `ret #0` below.
            let target = if copy + 1 < copies { (copy + 1) * len + to } else { copies * len };
            out[at].k = (target - at - 1) as u32;
        }
    }
    out.push(BpfInsn { code: cbpf::RET, jt: 0, jf: 0, k: 0 });
    Ok(Some(out))
}

/// Translates a classic BPF program.
pub fn translate(prog: &[BpfInsn]) -> Result<Fragment, TranslateError> {
    if prog.is_empty() {
        return Err(TranslateError::Empty);
    }
    let unrolled = unroll(prog)?;
    let prog = unrolled.as_deref().unwrap_or(prog);
    let reach = reachable(prog)?;
    let mut t = Translator { prog, out: Vec::new(), jumps: Vec::new(), scratch: 0, uses_len: false };
    let mut map = vec![usize::MAX; prog.len()];
    t.translate(&reach, &mut map)?;
    if t.out.len() > MAX_FILTER_INSNS {
        return Err(TranslateError::TooLarge { insns: t.out.len() });
    }
    // Jumps to classic instructions become jumps within the fragment now; "match" and
    // "no match" stay open for `link`.
    let mut jumps = Vec::new();
    for (at, target) in t.jumps {
        match target {
            Target::Cbpf(to) => {
                debug_assert!(map[to] != usize::MAX, "jump to an instruction left out");
                t.out[at].off = (map[to] as i64 - at as i64 - 1) as i16;
            }
            other => jumps.push((at, other)),
        }
    }
    Ok(Fragment { insns: t.out, jumps, scratch: t.scratch, uses_len: t.uses_len })
}

impl Fragment {
    /// eBPF instructions the fragment has before linking.
    pub fn len(&self) -> usize {
        self.insns.len()
    }

    /// Whether it has none (never: a filter has at least its first instruction).
    pub fn is_empty(&self) -> bool {
        self.insns.is_empty()
    }

    /// Appends the fragment to `out`, followed by the code that sets `bit` of the mask
    /// register when it matches; "no match" continues after it.
    pub fn link(&self, out: &mut Vec<Insn>, bit: u32) {
        let base = out.len();
        out.extend_from_slice(&self.insns);
        let matched = out.len();
        let any_match = self.jumps.iter().any(|(_, t)| *t == Target::Match);
        if any_match {
            out.push(alu64_imm(MOV, R4, 1));
            out.push(alu64_imm(LSH, R4, bit as i32));
            out.push(alu64_reg(OR, MASK, R4));
        }
        let no_match = out.len();
        for &(at, target) in &self.jumps {
            let to = if target == Target::Match { matched } else { no_match };
            out[base + at].off = (to as i64 - (base + at) as i64 - 1) as i16;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::CbpfProgram;

    fn insn(code: u16, jt: u8, jf: u8, k: u32) -> BpfInsn {
        BpfInsn { code, jt, jf, k }
    }

    #[test]
    fn encoding_matches_the_kernel_layout() {
        // r2 = *(u16 *)(r7 + 12): code 0x69, dst 2, src 7.
        assert_eq!(load(H, 2, 7, 12).encode(), [0x69, 0x72, 12, 0, 0, 0, 0, 0]);
        // if w2 == 0x86dd goto +3
        assert_eq!(jmp_imm(JMP32, JEQ, 2, 0x86dd, 3).encode(), [0x16, 0x02, 3, 0, 0xdd, 0x86, 0, 0]);
        assert_eq!(exit().encode(), [0x95, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn protochains_loop_is_unrolled_into_forward_jumps() {
        for expression in ["ip protochain 6", "ip6 protochain \\udp", "protochain 17"] {
            let prog = CbpfProgram::compile(expression).unwrap();
            let original = prog.instructions();
            assert!(original.iter().enumerate().any(|(pc, i)| backward_target(pc, i).unwrap().is_some()));
            let unrolled = unroll(original).unwrap().unwrap();
            assert_eq!(unrolled.len(), (LOOP_PASSES + 1) * original.len() + 1);
            for (pc, insn) in unrolled.iter().enumerate() {
                assert_eq!(backward_target(pc, insn).unwrap(), None, "{expression}: {pc}");
            }
            let fragment = translate(original).unwrap_or_else(|e| panic!("{expression}: {e}"));
            assert!(fragment.len() < MAX_FILTER_INSNS, "{expression}: {}", fragment.len());
        }
        // A program without loops is translated as it is.
        assert!(unroll(CbpfProgram::compile("tcp").unwrap().instructions()).unwrap().is_none());
    }

    #[test]
    fn a_loop_is_taken_at_most_loop_passes_times() {
        // A = A + 1; if A > 1000 return it; else jump back: 1000 passes needed, LOOP_PASSES
        // allowed: the unrolled program ends in `ret #0`.
        let prog = [
            insn(0x04, 0, 0, 1),
            insn(0x25, 1, 0, 1000),
            insn(0x05, 0, 0, u32::MAX - 2),
            insn(0x16, 0, 0, 0),
        ];
        let unrolled = unroll(&prog).unwrap().unwrap();
        let last = unrolled.len() - 1;
        assert_eq!((unrolled[last].code, unrolled[last].k), (cbpf::RET, 0));
        let last_jump = LOOP_PASSES * prog.len() + 2;
        assert_eq!(last_jump + 1 + unrolled[last_jump].k as usize, last);
        // The first copy's jump goes to the second copy's first instruction.
        assert_eq!(2 + 1 + unrolled[2].k as usize, prog.len());
        translate(&prog).unwrap();
    }

    #[test]
    fn extension_loads_are_refused() {
        // ld vlan_tci-present: the form a live Linux handle emits for `vlan`.
        let prog = [insn(0x30, 0, 0, SKF_AD_OFF + 44), insn(0x06, 0, 0, 1)];
        let err = translate(&prog).unwrap_err();
        assert!(err.to_string().contains("SKF_AD"), "{err}");
    }

    #[test]
    fn unreachable_code_is_left_out() {
        // ret #1 followed by code nothing reaches.
        let prog = [insn(0x06, 0, 0, 1), insn(0x00, 0, 0, 7), insn(0x06, 0, 0, 0)];
        let fragment = translate(&prog).unwrap();
        // A = 0, X = 0, goto match.
        assert_eq!(fragment.len(), 3);
    }

    #[test]
    fn a_jump_past_the_end_is_refused() {
        let prog = [insn(0x15, 5, 0, 1), insn(0x06, 0, 0, 0)];
        assert_eq!(translate(&prog).unwrap_err(), TranslateError::JumpOutOfRange { pc: 0 });
        assert_eq!(translate(&[insn(0x00, 0, 0, 1)]).unwrap_err(), TranslateError::FallsOffEnd);
        assert_eq!(translate(&[]).unwrap_err(), TranslateError::Empty);
    }

    #[test]
    fn constant_shifts_and_divisions_the_kernel_would_refuse() {
        let shl32 = [insn(0x64, 0, 0, 32), insn(0x16, 0, 0, 0)];
        assert!(translate(&shl32).unwrap_err().to_string().contains("32 or more"));
        let div0 = [insn(0x34, 0, 0, 0), insn(0x16, 0, 0, 0)];
        assert!(translate(&div0).unwrap_err().to_string().contains("zero"));
    }

    #[test]
    fn loads_no_frame_can_satisfy_end_the_filter() {
        // ld [40000]; jeq #1 ...: the load is "no match", the rest is unreachable.
        let prog = [insn(0x20, 0, 0, 40_000), insn(0x15, 0, 1, 1), insn(0x06, 0, 0, 1), insn(0x06, 0, 0, 0)];
        let fragment = translate(&prog).unwrap();
        assert_eq!(fragment.len(), 3, "A = 0, X = 0, goto no-match");
    }

    #[test]
    fn a_large_filter_stays_under_the_limit() {
        let hosts: Vec<String> = (0..500).map(|i| format!("host 10.{}.{}.1", i / 250, i % 250)).collect();
        let prog = CbpfProgram::compile(&hosts.join(" or ")).unwrap();
        let fragment = translate(prog.instructions()).unwrap();
        assert!(fragment.len() < MAX_FILTER_INSNS, "{}", fragment.len());
    }
}
