//! Basic blocks: guest code decoded once with iced-x86 into records that carry their
//! handler, cached by physical address and dropped when a page they came from is written.

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register,
};

use crate::cpu::{CS, Mode};
use crate::exec::{self, Handler};
use crate::machine::{Machine, R, gp, ud};
use crate::paging::Kind;
use crate::phys::Target;

/// A decoded instruction with everything the executor needs precomputed.
pub struct Insn {
    pub i: Instruction,
    pub h: Handler,
    /// RIP after this instruction (wrapped to the code size).
    pub next: u64,
    /// Address-size mask of the memory operand (or of string/stack addressing).
    pub amask: u64,
    /// Operand size in bytes (of the first operand, or the instruction's data size).
    pub osz: u8,
    /// General register number of operand 0 / operand 1 (0xff: not a plain GPR; AH-BH excluded).
    pub a: u8,
    pub b: u8,
    /// Immediate of the last immediate operand, sign-extended and masked to the operand size;
    /// the target of a near branch.
    pub imm: u64,
}

/// A run of instructions ending at a control transfer or a state change.
pub struct Block {
    pub phys: u64,
    pub rip: u64,
    pub bits: u32,
    /// (code page index, version at decode) of each page the block's bytes came from.
    pub pages: [(usize, u32); 2],
    pub npages: u8,
    pub insns: Box<[Insn]>,
    /// Executions so far (counted until the block is translated).
    pub hits: u32,
    /// The block's host-code translation.
    pub jit: Option<crate::jit::Code>,
    /// Set while the block is provisional: another core may still have been writing its
    /// bytes through a write translation from before their page became code.
    pub pending: Option<Box<Pending>>,
}

/// What a provisional block needs to be confirmed: once every other core has dropped its
/// old write translations (acknowledged `epoch`), the bytes it was decoded from are
/// compared with memory; equal, the block is final (every later write goes through a TLB
/// fill that sees the page as code and bumps its version); different, it is decoded again.
/// Until then it runs (cross-modifying code is only guaranteed to be seen after the writer
/// and the executor synchronize), but is neither chained nor translated.
pub struct Pending {
    epoch: u64,
    bytes: Box<[u8]>,
    /// How many of `bytes` are in the first page; the rest start the page at `phys2`.
    first: usize,
    phys2: u64,
}

/// Whether a provisional block can be used.
#[derive(PartialEq, Eq)]
enum Check {
    Confirmed,
    Wait,
    Stale,
}

impl Block {
    fn valid(&self, m: &Machine) -> bool {
        self.pages[..self.npages as usize]
            .iter()
            .all(|&(p, v)| m.phys.code.version(p) == v)
    }

    /// Check a provisional block against memory, and confirm it once every other core has
    /// acknowledged its epoch. Its bytes are compared on every check: a write another core
    /// made through an old translation must be seen by this core once it has synchronized
    /// with the writer (the SDM's protocol for cross-modifying code), even if the writer
    /// has not looked at the epoch yet.
    fn confirm(&mut self, m: &Machine) -> Check {
        let Some(p) = &self.pending else {
            return Check::Confirmed;
        };
        // Whether every other core had dropped its old write translations before the compare.
        let acked = m.phys.code.all_acked(p.epoch, &m.ack);
        let same = |phys: u64, want: &[u8]| match m.phys.lookup(phys) {
            // SAFETY: the bytes lie in one RAM page (the first part ends at its page's end,
            // the second starts a page and is at most 15 bytes long).
            Target::Ram(ptr, _) => unsafe { std::slice::from_raw_parts(ptr, want.len()) == want },
            Target::Mmio => false,
        };
        let ok = same(self.phys, &p.bytes[..p.first])
            && (p.first == p.bytes.len() || same(p.phys2, &p.bytes[p.first..]));
        match (ok, acked) {
            (false, _) => Check::Stale,
            (true, false) => Check::Wait,
            (true, true) => {
                self.pending = None;
                Check::Confirmed
            }
        }
    }
}

/// Direct-mapped entries in front of the map: a kernel's hot I/O paths span thousands of
/// blocks, which 4096 entries evicted from each other.
const FAST: usize = 32768;
/// The cache is dropped when it holds this many blocks (guests that generate code endlessly).
const MAX_BLOCKS: usize = 1 << 16;
/// Most host memory the decoded blocks of one core may hold; the cache is dropped when a new
/// block would pass it (a guest cannot pin more than this per vCPU).
pub const MAX_CACHE_BYTES: usize = 32 << 20;
/// Longest block.
const MAX_INSNS: usize = 64;

/// A remembered successor of a block: valid while the TLB generation, CS base, code size
/// and CPL are what they were when it was made.
#[derive(Clone, Copy, Default)]
struct Link {
    rip: u64,
    cs_base: u64,
    generation: u64,
    idx: u32,
    cpl: u8,
    bits: u8,
    used: bool,
    /// Code-page write count when the link was made or last checked.
    writes: u64,
}

/// Blocks of one core.
pub struct BlockCache {
    // Fx hashing: the keys are guest addresses, not attacker-chosen collisions against a
    // shared service, and SipHash showed up in profiles of kernel-heavy guests.
    map: rustc_hash::FxHashMap<(u64, u64, u32), u32>,
    pub blocks: Vec<Block>,
    fast: Box<[u32]>,
    links: Vec<[Link; 2]>,
    pub jit: crate::jit::Jit,
    /// Executions before a block is translated.
    threshold: u32,
    /// Bumped whenever a block is dropped or replaced: translations' links made before are
    /// void ([`crate::jit::Slot`]).
    link_epoch: u64,
    /// Host bytes the blocks hold (their records and links), bounded by [`MAX_CACHE_BYTES`].
    pub bytes: usize,
    /// Times the cache was dropped because it was full (by count, by bytes or the JIT's arena).
    pub drops: u64,
}

/// Host bytes block `b` holds in the cache.
fn block_bytes(b: &Block) -> usize {
    std::mem::size_of::<Block>()
        + std::mem::size_of::<[Link; 2]>()
        + b.insns.len() * std::mem::size_of::<Insn>()
}

impl Default for BlockCache {
    fn default() -> Self {
        BlockCache {
            map: Default::default(),
            blocks: Vec::new(),
            fast: vec![u32::MAX; FAST].into_boxed_slice(),
            links: Vec::new(),
            jit: crate::jit::Jit::default(),
            threshold: crate::jit::THRESHOLD,
            link_epoch: 0,
            bytes: 0,
            drops: 0,
        }
    }
}

#[inline]
fn fast_slot(phys: u64, rip: u64) -> usize {
    ((phys ^ (phys >> 12) ^ (rip << 3)) as usize) & (FAST - 1)
}

impl BlockCache {
    pub fn with_threshold(threshold: u32) -> Self {
        BlockCache {
            threshold: threshold.max(1),
            ..Default::default()
        }
    }

    /// The block at the current CS:RIP, decoding it if needed.
    pub fn lookup(&mut self, m: &mut Machine) -> R<u32> {
        if self.jit.full {
            self.drops += 1;
            self.clear();
        }
        let rip = m.cpu.rip;
        let bits = m.cpu.bits;
        let lin = code_linear(m, rip, 1)?;
        let phys = match fetch_target(m, lin)? {
            (p, Target::Ram(..)) => p,
            // Code in memory that is not RAM (a device, or nothing): the emulator does not
            // execute device registers. The guest gets #UD, as fetching the all-ones bytes
            // of an open bus gives on hardware, instead of the whole VM ending.
            (_, Target::Mmio) => return Err(ud()),
        };
        let slot = fast_slot(phys, rip);
        let idx = self.fast[slot];
        if let Some(b) = self.blocks.get_mut(idx as usize)
            && b.phys == phys
            && b.rip == rip
            && b.bits == bits
            && b.valid(m)
            && second_page_ok(b, m, lin)
            && usable(b, m)
        {
            return Ok(idx);
        }
        let key = (phys, rip, bits);
        if let Some(&idx) = self.map.get(&key) {
            let b = &mut self.blocks[idx as usize];
            if b.valid(m) && second_page_ok(b, m, lin) && usable(b, m) {
                self.fast[slot] = idx;
                return Ok(idx);
            }
            let b = decode(m, lin, phys, rip, bits)?;
            self.link_epoch += 1;
            self.bytes = self.bytes - block_bytes(&self.blocks[idx as usize]) + block_bytes(&b);
            self.blocks[idx as usize] = b;
            self.fast[slot] = idx;
            return Ok(idx);
        }
        let b = decode(m, lin, phys, rip, bits)?;
        if self.blocks.len() >= MAX_BLOCKS || self.bytes + block_bytes(&b) > MAX_CACHE_BYTES {
            self.drops += 1;
            self.clear();
        }
        self.bytes += block_bytes(&b);
        let idx = self.blocks.len() as u32;
        self.blocks.push(b);
        self.links.push([Link::default(); 2]);
        self.map.insert(key, idx);
        self.fast[slot] = idx;
        Ok(idx)
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.blocks.clear();
        self.links.clear();
        self.bytes = 0;
        // Give the memory back too (a cleared Vec keeps its capacity).
        if self.blocks.capacity() > 4096 {
            self.blocks.shrink_to(4096);
            self.links.shrink_to(4096);
        }
        self.fast.fill(u32::MAX);
        self.jit.reset();
        self.link_epoch += 1;
    }

    /// Run block `idx` through its translation, translating it once it is hot. None when
    /// the interpreter should run it (not hot yet, not translatable, another CPL).
    pub fn run_jit(
        &mut self,
        idx: u32,
        m: &mut Machine,
        budget: u64,
        kick: &std::sync::atomic::AtomicBool,
    ) -> Option<crate::jit::Ran> {
        let b = self.blocks.get_mut(idx as usize)?;
        if b.pending.is_some() {
            return None; // provisional: interpreted until confirmed
        }
        if b.jit.is_none() {
            if b.hits >= self.threshold {
                return None; // translation was refused
            }
            b.hits += 1;
            if b.hits < self.threshold {
                return None;
            }
            b.jit = self.jit.compile(b, m);
            if b.jit.is_some() {
                m.stats.blocks_translated += 1;
            }
        }
        let c = b.jit.as_ref()?;
        if c.cpl != m.cpu.cpl {
            return None;
        }
        Some(crate::jit::run(c, m, budget, kick, self.link_epoch))
    }

    pub fn link_epoch(&self) -> u64 {
        self.link_epoch
    }

    /// After a translation's exit went back to the dispatcher through `slot` and block
    /// `to` (at the current RIP) was found: link them if `to` is translated. `epoch`: the
    /// link epoch when the translation ran.
    pub fn link(&self, slot: *mut crate::jit::Slot, epoch: u64, to: u32, m: &Machine) {
        if slot.is_null() || epoch != self.link_epoch {
            return; // the slot's block may be gone
        }
        if let Some(c) = self.blocks.get(to as usize).and_then(|b| b.jit.as_ref())
            && c.cpl == m.cpu.cpl
        {
            // SAFETY: the epoch is unchanged since the run, so the slot's block is alive.
            unsafe { crate::jit::link(slot, c, m, epoch) };
        }
    }

    /// The block after block `prev` (chained when possible, else looked up and linked).
    #[inline]
    pub fn next(&mut self, m: &mut Machine, prev: u32) -> R<u32> {
        // A page that another core just turned into code loses its write translations here
        // too, so cross-modifying writes are seen while this core keeps chaining.
        m.sync_code_epoch();
        m.cpu.flags &= !crate::cpu::fl::RF;
        let rip = m.cpu.rip;
        let cs_base = m.cpu.seg[CS].base;
        let writes = m.phys.code.writes();
        if let Some(ls) = self.links.get_mut(prev as usize) {
            for l in ls.iter_mut() {
                if l.used
                    && l.rip == rip
                    && l.generation == m.tlb.generation
                    && l.cs_base == cs_base
                    && l.cpl == m.cpu.cpl
                    && u32::from(l.bits) == m.cpu.bits
                {
                    if l.writes == writes
                        && self
                            .blocks
                            .get(l.idx as usize)
                            .is_some_and(|b| b.pending.is_none())
                    {
                        return Ok(l.idx);
                    }
                    if let Some(b) = self.blocks.get(l.idx as usize)
                        && b.rip == rip
                        && b.valid(m)
                        && b.pending.is_none()
                    {
                        l.writes = writes;
                        return Ok(l.idx);
                    }
                }
            }
        }
        let len_before = self.blocks.len();
        let idx = self.lookup(m)?;
        if self.blocks.len() < len_before || self.blocks[idx as usize].pending.is_some() {
            // The cache was dropped (prev is gone), or the block is provisional.
            return Ok(idx);
        }
        if let Some(ls) = self.links.get_mut(prev as usize) {
            let slot = if !ls[0].used || ls[0].rip == rip {
                0
            } else {
                1
            };
            if slot == 1 && ls[1].used && ls[1].rip != rip {
                ls[1] = ls[0];
            }
            ls[slot] = Link {
                rip,
                cs_base,
                generation: m.tlb.generation,
                idx,
                cpl: m.cpu.cpl,
                bits: m.cpu.bits as u8,
                used: true,
                writes,
            };
        }
        Ok(idx)
    }
}

/// Whether a block may run: confirmed, or provisional with its bytes still in memory.
#[inline]
fn usable(b: &mut Block, m: &mut Machine) -> bool {
    if b.pending.is_none() {
        return true;
    }
    m.stats.provisional_checks += 1;
    match b.confirm(m) {
        Check::Stale => {
            m.stats.cross_modified += 1;
            false
        }
        _ => true,
    }
}

/// A block whose last instruction runs into the next page is only good while that page is
/// still mapped, executable, to the frame its bytes came from: a remapped or not-present
/// second page makes the block be decoded again (which faults at that instruction).
fn second_page_ok(b: &Block, m: &mut Machine, lin: u64) -> bool {
    if b.npages < 2 {
        return true;
    }
    let mut next = (lin | 0xfff).wrapping_add(1);
    if m.cpu.mode != Mode::Long64 {
        next &= 0xffff_ffff;
    }
    matches!(fetch_target(m, next), Ok((_, Target::Ram(_, p))) if p == b.pages[1].0)
}

/// Linear address of CS:`rip`, checking `len` bytes against the CS limit outside 64-bit mode.
pub fn code_linear(m: &Machine, rip: u64, len: u64) -> R<u64> {
    let cs = &m.cpu.seg[CS];
    if m.cpu.mode == Mode::Long64 {
        // A non-canonical RIP is never fetched: #GP(0). Branches check their targets (the
        // fault comes on the branch, as on hardware); this catches execution running off the
        // end of the lower half.
        if ((rip as i64) << 16 >> 16) as u64 != rip {
            return Err(gp(0));
        }
        return Ok(rip);
    }
    if m.cpu.mode != Mode::Real && rip.wrapping_add(len - 1) > u64::from(cs.limit) {
        return Err(gp(0));
    }
    Ok(cs.base.wrapping_add(rip) & 0xffff_ffff)
}

fn fetch_target(m: &mut Machine, lin: u64) -> R<(u64, Target)> {
    let user = m.cpu.cpl == 3;
    let e = &m.tlb.sets[user as usize][crate::paging::Tlb::slot(lin)];
    if e.page == lin >> 12 && e.perm & crate::paging::perm::X != 0 {
        let off = lin & 0xfff;
        // SAFETY: the entry maps the whole page to host RAM.
        let p = unsafe { e.host.add(off as usize) };
        return Ok((e.phys | off, Target::Ram(p, e.code_page)));
    }
    m.translate(lin, Kind::Fetch, user)
}

/// Decode the block at `lin` (physical `phys`), CS:IP = `rip`.
fn decode(m: &mut Machine, lin: u64, phys: u64, rip: u64, bits: u32) -> R<Block> {
    m.stats.blocks_decoded += 1;
    let Target::Ram(p, page) = m.phys.lookup(phys) else {
        unreachable!("lookup checked RAM");
    };
    let in_page = (0x1000 - (lin & 0xfff)) as usize;
    // Mark the page as code and read its version before copying its bytes: a write made by
    // another core after the copy then either bumps the version (the block is stale at
    // once) or is seen in the copy. (Copying first left a window where such a write was in
    // neither, and the block stayed stale.)
    m.phys.code.mark_code(page);
    let v1 = m.phys.code.version(page);
    let mut bytes = Vec::with_capacity(in_page + 15);
    // SAFETY: `p` is the host address of `phys`; the rest of its page is backed.
    bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(p, in_page) });
    // The next page, if it is code-fetchable RAM: instructions may straddle the boundary.
    let mut second: Option<(usize, *mut u8, u64)> = None;
    let next_lin = lin.wrapping_add(in_page as u64);
    let next_ok = if m.cpu.mode == Mode::Long64 {
        crate::machine::canonical(next_lin)
    } else {
        next_lin <= 0xffff_ffff
    };
    // An instruction that runs into the non-canonical hole is #GP(0), as its fetch would be.
    let mut second_fault = (!next_ok && m.cpu.mode == Mode::Long64).then(|| gp(0));
    if next_ok {
        match fetch_target(
            m,
            if m.cpu.mode == Mode::Long64 {
                next_lin
            } else {
                next_lin & 0xffff_ffff
            },
        ) {
            Ok((phys2, Target::Ram(p2, page2))) => {
                // SAFETY: `p2` is the start of a backed page; 15 bytes stay within it.
                bytes.extend_from_slice(unsafe { std::slice::from_raw_parts(p2, 15) });
                second = Some((page2, p2, phys2));
            }
            Ok((_, Target::Mmio)) => {}
            Err(f) => second_fault = Some(f),
        }
    }
    // CS limit: do not decode past it.
    let limit_left = if m.cpu.mode == Mode::Long64 || m.cpu.mode == Mode::Real {
        usize::MAX
    } else {
        (u64::from(m.cpu.seg[CS].limit).saturating_sub(rip) + 1) as usize
    };
    let avail = bytes.len().min(limit_left);
    let mut dec = Decoder::with_ip(bits, &bytes[..avail], rip, DecoderOptions::NONE);
    let ipmask = match bits {
        16 => 0xffff,
        32 => 0xffff_ffff,
        _ => u64::MAX,
    };
    let mut insns = Vec::new();
    let mut uses_second = false;
    let mut ins = Instruction::default();
    while dec.can_decode() && insns.len() < MAX_INSNS {
        let start = dec.position();
        if start >= in_page {
            break;
        }
        dec.decode_out(&mut ins);
        let end = dec.position();
        let truncated =
            ins.code() == Code::INVALID && dec.last_error() == iced_x86::DecoderError::NoMoreBytes;
        if truncated || (end > in_page && second.is_none()) {
            if !insns.is_empty() {
                break;
            }
            // The first instruction itself cannot be fetched whole.
            if avail < bytes.len() {
                return Err(gp(0)); // past the CS limit
            }
            return Err(second_fault.unwrap_or_else(ud));
        }
        if end > in_page {
            uses_second = true;
        }
        let insn = prepare(ins, ipmask, bits);
        let stop = ends_block(&insn.i);
        insns.push(insn);
        if stop || uses_second {
            break;
        }
    }
    if insns.is_empty() {
        return Err(gp(0));
    }
    let mut pages = [(page, v1), (0, 0)];
    let mut npages = 1;
    if uses_second {
        let (page2, p2, _) = second.expect("second page present");
        m.phys.code.mark_code(page2);
        let v2 = m.phys.code.version(page2);
        // The second page's bytes were copied before it was marked: if they changed since,
        // leave this block to the version check (a version from before the change).
        // SAFETY: as above, 15 bytes at the start of a backed page.
        let now = unsafe { std::slice::from_raw_parts(p2, 15) };
        let v2 = if now == &bytes[in_page..in_page + 15] {
            v2
        } else {
            v2.wrapping_sub(1)
        };
        pages[1] = (page2, v2);
        npages = 2;
    }
    // The pages are code now: this core must not keep writing them through the TLB.
    m.sync_code_epoch();
    // Other cores may not have dropped theirs yet: the block is provisional until they have
    // (an epoch read after both pages were marked covers both).
    let epoch = m.phys.code.epoch();
    let pending = m.phys.code.shared(&m.ack).then(|| {
        let used = insns.iter().map(|x| x.i.len()).sum::<usize>();
        Box::new(Pending {
            epoch,
            bytes: bytes[..used].into(),
            first: used.min(in_page),
            phys2: second.map_or(0, |(_, _, phys2)| phys2),
        })
    });
    let mut b = Block {
        phys,
        rip,
        bits,
        pages,
        npages,
        insns: insns.into_boxed_slice(),
        hits: 0,
        jit: None,
        pending,
    };
    // Usually the other cores have acknowledged already (or are not running).
    if b.pending.is_some() && b.confirm(m) != Check::Confirmed {
        m.stats.blocks_provisional += 1;
    }
    Ok(b)
}

/// Precompute an instruction's record.
pub fn prepare(i: Instruction, ipmask: u64, bits: u32) -> Insn {
    let amask = address_mask(&i, bits);
    let osz = operand_size(&i);
    let gpr = |n: u32| -> u8 {
        if n < i.op_count() && i.op_kind(n) == OpKind::Register {
            exec::gpr_number(i.op_register(n)).unwrap_or(0xff)
        } else {
            0xff
        }
    };
    let mut imm = 0;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
                imm = i.near_branch_target()
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => imm = i.immediate(n) & exec::mask(u64::from(osz.min(8))),
            _ => {}
        }
    }
    Insn {
        h: exec::handler(&i),
        next: i.next_ip() & ipmask,
        amask,
        osz,
        a: gpr(0),
        b: gpr(1),
        imm,
        i,
    }
}

fn reg_mask(r: Register) -> u64 {
    match r.size() {
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn address_mask(i: &Instruction, bits: u32) -> u64 {
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Memory => {
                if i.memory_base() != Register::None {
                    return reg_mask(i.memory_base());
                }
                if i.memory_index() != Register::None {
                    return reg_mask(i.memory_index());
                }
                return match i.memory_displ_size() {
                    2 => 0xffff,
                    4 => 0xffff_ffff,
                    8 => u64::MAX,
                    _ => default_mask(bits),
                };
            }
            OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI => return 0xffff,
            OpKind::MemorySegESI | OpKind::MemorySegEDI | OpKind::MemoryESEDI => {
                return 0xffff_ffff;
            }
            OpKind::MemorySegRSI | OpKind::MemorySegRDI | OpKind::MemoryESRDI => return u64::MAX,
            _ => {}
        }
    }
    // Instructions with implicit addressing (LOOP's counter, XLAT, JCXZ) carry an address-size prefix.
    let mut mask = default_mask(bits);
    if i.mnemonic() == Mnemonic::Xlatb {
        mask = reg_mask(i.memory_base());
    }
    mask
}

fn default_mask(bits: u32) -> u64 {
    match bits {
        16 => 0xffff,
        32 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

fn operand_size(i: &Instruction) -> u8 {
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if r.is_gpr() {
                    return r.size() as u8;
                }
            }
            OpKind::Memory => {
                let s = i.memory_size().size();
                if s > 0 {
                    return s.min(16) as u8;
                }
            }
            _ => {}
        }
    }
    // String instructions and others: the memory size of the data.
    let s = i.memory_size().size();
    if s > 0 { s.min(16) as u8 } else { 4 }
}

/// Whether the block must end after `i`.
fn ends_block(i: &Instruction) -> bool {
    if i.flow_control() != FlowControl::Next {
        return true;
    }
    use Mnemonic::*;
    match i.mnemonic() {
        Mov => {
            // MOV to a control/debug register or to SS.
            let r = i.op0_register();
            i.op0_kind() == OpKind::Register && (r.is_cr() || r.is_dr() || r == Register::SS)
        }
        Pop => i.op0_kind() == OpKind::Register && i.op0_register() == Register::SS,
        Lmsw | Clts | Wrmsr | Popf | Popfd | Popfq | Sti | Cli | Invlpg | Hlt | Lgdt | Lidt
        | Lldt | Ltr | In | Out | Insb | Insw | Insd | Outsb | Outsw | Outsd | Cpuid | Rdmsr
        | Wbinvd | Invd | Xsetbv | Pause | Mwait | Monitor | Vmcall | Vmmcall => true,
        _ => i.code() == Code::INVALID,
    }
}
