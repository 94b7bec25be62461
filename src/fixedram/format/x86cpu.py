"""x86 vCPU state as saved in a ``cpu`` device section, in a debugger's terms.

The decoded ``cpu`` section (see :mod:`.devstate`) names fields as QEMU's
vmstate does (``env.regs``, ``env.eip``, ``env.segs`` ...). Cores for
debuggers need them in fixed orders instead (the kernel's
``user_regs_struct``, QEMU's own CPU-state note), so this module is the one
place that maps one to the other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GPR_NAMES", "SEG_NAMES", "Segment", "X86CPUState"]

# QEMU's register order in env.regs (R_EAX=0 ... R_EDI=7, then R8..R15).
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
# QEMU's segment order in env.segs (R_ES=0, R_CS=1, R_SS=2, R_DS=3, R_FS=4, R_GS=5).
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")


@dataclass(frozen=True)
class Segment:
    """A segment register or descriptor-table register as QEMU keeps it."""

    selector: int
    base: int
    limit: int
    flags: int


@dataclass(frozen=True)
class X86CPUState:
    """One vCPU's architectural state, taken from its saved ``cpu`` section.

    :ivar index: the vCPU number (the section's instance id).
    :ivar regs: the 16 general-purpose registers in QEMU's order (:data:`GPR_NAMES`).
    :ivar segs: ES, CS, SS, DS, FS, GS (:data:`SEG_NAMES`).
    :ivar cr: CR0..CR4 (CR1 is always 0).
    """

    index: int
    regs: tuple[int, ...]
    rip: int
    rflags: int
    segs: tuple[Segment, ...]
    ldt: Segment
    tr: Segment
    gdt: Segment
    idt: Segment
    cr: tuple[int, int, int, int, int]
    efer: int
    kernel_gs_base: int
    hflags: int

    def gpr(self, name: str) -> int:
        return self.regs[GPR_NAMES.index(name)]

    def seg(self, name: str) -> Segment:
        return self.segs[SEG_NAMES.index(name)]
