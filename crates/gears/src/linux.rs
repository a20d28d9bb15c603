//! What GEARS knows of a Linux guest: the layout its helper module (guests/gears/gears.c)
//! reports through the GEARS_LINUX_INFO hypercall, and reading tasks with it: the current task
//! of a core, a process by pid, the process list, and a process's address space.
//!
//! Everything read here is guest-controlled: lengths and loops are bounded, and a bad pointer
//! ends a lookup with an error, never a hang or a read outside guest RAM.

use palacios_vmm::GuestMem;
use palacios_vmm::intercept::space_of;

use crate::walk::{self, WalkError};

/// "GERS" in the structure's first four bytes.
pub const MAGIC: u32 = 0x5352_4547;
pub const VERSION: u32 = 1;
/// Size of version 1 of the structure.
pub const INFO_SIZE: usize = 80;
/// Longest process list walked.
const MAX_TASKS: usize = 65_536;

/// The guest kernel's layout (struct gears_linux_info, version 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LinuxInfo {
    /// Per-CPU offset of `current_task` (read at GS base + this).
    pub current_task: u64,
    pub init_task: u64,
    pub page_offset: u64,
    /// Physical address of init_mm's page directory (kernel mappings, never freed).
    pub kernel_pgd: u64,
    pub off_pid: u32,
    pub off_tgid: u32,
    pub off_comm: u32,
    pub off_mm: u32,
    pub off_tasks: u32,
    pub off_stack: u32,
    pub off_mm_pgd: u32,
    pub thread_size: u32,
    pub off_real_parent: u32,
}

impl LinuxInfo {
    /// Parse and check the structure (guest input).
    pub fn parse(b: &[u8]) -> Result<LinuxInfo, String> {
        if b.len() < INFO_SIZE {
            return Err(format!(
                "the layout is {} bytes, version 1 has {INFO_SIZE}",
                b.len()
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if u32_at(0) != MAGIC {
            return Err(format!("bad magic {:#x}", u32_at(0)));
        }
        if u32_at(4) != VERSION {
            return Err(format!(
                "layout version {} (this VMM reads {VERSION})",
                u32_at(4)
            ));
        }
        let i = LinuxInfo {
            current_task: u64_at(8),
            init_task: u64_at(16),
            page_offset: u64_at(24),
            kernel_pgd: u64_at(32),
            off_pid: u32_at(40),
            off_tgid: u32_at(44),
            off_comm: u32_at(48),
            off_mm: u32_at(52),
            off_tasks: u32_at(56),
            off_stack: u32_at(60),
            off_mm_pgd: u32_at(64),
            thread_size: u32_at(68),
            off_real_parent: u32_at(72),
        };
        let offs = [
            i.off_pid,
            i.off_tgid,
            i.off_comm,
            i.off_mm,
            i.off_tasks,
            i.off_stack,
            i.off_real_parent,
        ];
        if offs.iter().any(|o| *o >= 16_384) || i.off_mm_pgd >= 4096 {
            return Err("a structure offset is implausibly large".into());
        }
        if !i.thread_size.is_power_of_two() || !(4096..=65_536).contains(&i.thread_size) {
            return Err(format!("thread size {} is not plausible", i.thread_size));
        }
        if i.page_offset < 0xffff_8000_0000_0000 || i.init_task < 0xffff_8000_0000_0000 {
            return Err("kernel addresses must be in the upper half".into());
        }
        if i.kernel_pgd & 0xfff != 0 {
            return Err("the kernel page directory is not page-aligned".into());
        }
        Ok(i)
    }
}

/// One task as read from guest memory.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Task {
    /// Address of its task_struct.
    #[serde(serialize_with = "hex")]
    pub addr: u64,
    /// Thread id.
    pub pid: u32,
    /// Process id.
    pub tgid: u32,
    pub comm: String,
    /// Its address space ([`space_of`] its page directory); `None` for kernel threads.
    pub space: Option<u64>,
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

/// Reads of a Linux guest's kernel memory.
pub struct Kernel<'a> {
    pub mem: &'a GuestMem,
    pub info: &'a LinuxInfo,
}

impl Kernel<'_> {
    fn root(&self) -> u64 {
        self.info.kernel_pgd
    }

    pub fn u64(&self, va: u64) -> Result<u64, WalkError> {
        walk::read_u64(self.mem, self.root(), va)
    }

    /// The task_struct at `addr`.
    pub fn task(&self, addr: u64) -> Result<Task, WalkError> {
        let i = self.info;
        let pid = walk::read_u32(
            self.mem,
            self.root(),
            addr.wrapping_add(u64::from(i.off_pid)),
        )?;
        let tgid = walk::read_u32(
            self.mem,
            self.root(),
            addr.wrapping_add(u64::from(i.off_tgid)),
        )?;
        let mut comm = [0u8; 16];
        walk::read(
            self.mem,
            self.root(),
            addr.wrapping_add(u64::from(i.off_comm)),
            &mut comm,
            false,
        )?;
        let end = comm.iter().position(|b| *b == 0).unwrap_or(16);
        let mm = self.u64(addr.wrapping_add(u64::from(i.off_mm)))?;
        let space = if mm == 0 {
            None
        } else {
            let pgd = self.u64(mm.wrapping_add(u64::from(i.off_mm_pgd)))?;
            Some(space_of(pgd.wrapping_sub(i.page_offset)))
        };
        Ok(Task {
            addr,
            pid,
            tgid,
            comm: String::from_utf8_lossy(&comm[..end]).into_owned(),
            space,
        })
    }

    /// The base of the task's kernel stack (`task_struct.stack`).
    pub fn stack_of(&self, task: u64) -> Result<u64, WalkError> {
        self.u64(task.wrapping_add(u64::from(self.info.off_stack)))
    }

    /// The task running on a core whose kernel GS base is `gs_base`.
    pub fn current(&self, gs_base: u64) -> Result<Task, WalkError> {
        let t = self.u64(gs_base.wrapping_add(self.info.current_task))?;
        self.task(t)
    }

    /// Every process (thread-group leader) on the task list, init_task first.
    pub fn processes(&self) -> Result<Vec<Task>, WalkError> {
        let off = u64::from(self.info.off_tasks);
        let head = self.info.init_task.wrapping_add(off);
        let mut out = vec![self.task(self.info.init_task)?];
        let mut link = self.u64(head)?;
        while link != head {
            if out.len() >= MAX_TASKS {
                return Err(WalkError::BadTables);
            }
            let t = link.wrapping_sub(off);
            out.push(self.task(t)?);
            link = self.u64(link)?;
        }
        Ok(out)
    }

    /// The process with this pid (its thread-group leader).
    pub fn process(&self, pid: u32) -> Result<Option<Task>, WalkError> {
        Ok(self.processes()?.into_iter().find(|t| t.tgid == pid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palacios_vmm::test_support;
    use vm_memory::{Bytes, GuestAddress};

    pub fn info_bytes(i: &LinuxInfo) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend(MAGIC.to_le_bytes());
        b.extend(VERSION.to_le_bytes());
        for v in [i.current_task, i.init_task, i.page_offset, i.kernel_pgd] {
            b.extend(v.to_le_bytes());
        }
        for v in [
            i.off_pid,
            i.off_tgid,
            i.off_comm,
            i.off_mm,
            i.off_tasks,
            i.off_stack,
            i.off_mm_pgd,
            i.thread_size,
            i.off_real_parent,
            0,
        ] {
            b.extend(v.to_le_bytes());
        }
        b
    }

    const KBASE: u64 = 0xffff_8880_0000_0000;

    fn layout() -> LinuxInfo {
        LinuxInfo {
            current_task: 0x100,
            init_task: KBASE + 0x1_0000,
            page_offset: KBASE - 0x20_0000,
            kernel_pgd: 0x1000,
            off_pid: 0x10,
            off_tgid: 0x14,
            off_comm: 0x20,
            off_mm: 0x30,
            off_tasks: 0x40,
            off_stack: 0x50,
            off_mm_pgd: 0x8,
            thread_size: 16384,
            off_real_parent: 0x58,
        }
    }

    #[test]
    fn parse_checks_magic_version_and_plausibility() {
        let i = layout();
        let b = info_bytes(&i);
        assert_eq!(b.len(), INFO_SIZE);
        assert_eq!(LinuxInfo::parse(&b).unwrap(), i);
        assert!(LinuxInfo::parse(&b[..40]).unwrap_err().contains("80"));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(LinuxInfo::parse(&bad).unwrap_err().contains("magic"));
        let mut bad = b.clone();
        bad[68..72].copy_from_slice(&12345u32.to_le_bytes());
        assert!(LinuxInfo::parse(&bad).unwrap_err().contains("thread size"));
        let mut bad = b;
        bad[40..44].copy_from_slice(&100_000u32.to_le_bytes());
        assert!(LinuxInfo::parse(&bad).is_err());
    }

    /// Kernel memory is the 2 MiB page at KBASE (physical 0x20_0000) of walk's test tables.
    fn put_task(mem: &GuestMem, i: &LinuxInfo, va: u64, pid: u32, comm: &str, next: u64, mm: u64) {
        let pa = |v: u64| GuestAddress(v - KBASE + 0x20_0000);
        mem.write_obj(pid, pa(va + u64::from(i.off_pid))).unwrap();
        mem.write_obj(pid, pa(va + u64::from(i.off_tgid))).unwrap();
        let mut c = [0u8; 16];
        c[..comm.len()].copy_from_slice(comm.as_bytes());
        mem.write_slice(&c, pa(va + u64::from(i.off_comm))).unwrap();
        mem.write_obj(mm, pa(va + u64::from(i.off_mm))).unwrap();
        mem.write_obj(next, pa(va + u64::from(i.off_tasks)))
            .unwrap();
    }

    #[test]
    fn reads_tasks_the_current_task_and_the_process_list() {
        let mem = test_support::guest_mem(4 << 20);
        crate::walk::tests::tables(&mem);
        let i = layout();
        let k = Kernel {
            mem: &mem,
            info: &i,
        };
        let (t0, t1, t2) = (i.init_task, KBASE + 0x2_0000, KBASE + 0x3_0000);
        let mm = KBASE + 0x4_0000;
        // The mm's pgd: a direct-map address whose physical address is 0x1234_6000 | PTI bit.
        let pgd = i.page_offset + 0x1234_7000;
        mem.write_obj(pgd, GuestAddress(mm - KBASE + 0x20_0000 + 8))
            .unwrap();
        put_task(&mem, &i, t0, 0, "swapper/0", t1 + 0x40, 0);
        put_task(&mem, &i, t1, 1, "init", t2 + 0x40, mm);
        put_task(&mem, &i, t2, 42, "busybox", t0 + 0x40, mm);
        let ps = k.processes().unwrap();
        assert_eq!(ps.iter().map(|t| t.pid).collect::<Vec<_>>(), vec![0, 1, 42]);
        assert_eq!(ps[0].space, None);
        assert_eq!(ps[2].comm, "busybox");
        assert_eq!(ps[2].space, Some(0x1234_6000));
        assert_eq!(k.process(42).unwrap().unwrap().addr, t2);
        assert_eq!(k.process(7).unwrap(), None);
        // current: GS base + 0x100 holds the task pointer.
        let gs = KBASE + 0x5_0000;
        mem.write_obj(t2, GuestAddress(gs + 0x100 - KBASE + 0x20_0000))
            .unwrap();
        assert_eq!(k.current(gs).unwrap().tgid, 42);
        // A list that loops without returning to the head ends with an error, not a hang.
        put_task(&mem, &i, t2, 42, "busybox", t1 + 0x40, mm);
        assert!(k.processes().is_err());
        // A wild pointer is an error.
        put_task(&mem, &i, t2, 42, "busybox", 0x1234, mm);
        assert!(k.processes().is_err());
    }
}
