"""x86 vCPU state as saved in a ``cpu`` device section, in a debugger's terms.

The decoded ``cpu`` section (see :mod:`.devstate`) names fields as QEMU's
vmstate does (``env.regs``, ``env.eip``, ``env.segs`` ...). Cores for
debuggers need them in fixed orders instead (the kernel's
``user_regs_struct``, QEMU's own CPU-state note), so this module is the one
place that maps one to the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedFeature

if TYPE_CHECKING:
    from .devstate import DeviceState

__all__ = ["CPU_SECTION_VERSIONS", "GPR_NAMES", "SEG_NAMES", "Segment", "X86CPUState",
           "x86_cpu_states"]

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


# vmstate_x86_cpu versions whose field names and meaning were checked (QEMU 7.2 and 10.0
# both save version 12). Another version may move or reinterpret fields: refuse it.
CPU_SECTION_VERSIONS = frozenset({12})
_U64 = 1 << 64


def x86_cpu_states(devices: list[DeviceState]) -> list[X86CPUState]:
    """The x86-64 vCPUs among decoded device sections (``cpu``), ordered by vCPU number.

    :raise UnsupportedFeature: a ``cpu`` section of a version or field set this
        mapping does not know (a 32-bit target, a new QEMU); callers then omit
        the registers rather than guess them.
    """
    out = [_cpu_state(d) for d in devices if d.name == "cpu"]
    out.sort(key=lambda c: c.index)
    return out


class _Fields:
    """Typed access to one decoded cpu section; any surprise is UnsupportedFeature."""

    def __init__(self, dev: DeviceState) -> None:
        self.dev = dev
        self.f = dev.fields

    def refuse(self, why: str) -> UnsupportedFeature:
        d = self.dev
        return UnsupportedFeature(f"cpu section (vCPU {d.instance_id}, version {d.version_id}): "
                                  f"{why}; its registers are not decoded", offset=d.offset)

    def u64(self, name: str, v: Any = None) -> int:
        v = self.f.get(name) if v is None else v
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < _U64:
            raise self.refuse(f"field {name!r} is missing or not a 64-bit value")
        return v

    def seg(self, name: str, v: Any = None) -> Segment:
        v = self.f.get(name) if v is None else v
        if not isinstance(v, Mapping):
            raise self.refuse(f"field {name!r} is missing or not a segment")
        return Segment(*(self.u64(f"{name}.{k}", v.get(k))
                         for k in ("selector", "base", "limit", "flags")))

    def array(self, name: str, n: int) -> list[Any]:
        v = self.f.get(name)
        if not isinstance(v, list) or len(v) != n:
            raise self.refuse(f"field {name!r} is not an array of {n}")
        return v


def _cpu_state(dev: DeviceState) -> X86CPUState:
    c = _Fields(dev)
    if dev.version_id not in CPU_SECTION_VERSIONS:
        raise c.refuse("unknown section version (known: "
                       f"{', '.join(map(str, sorted(CPU_SECTION_VERSIONS)))})")
    regs = tuple(c.u64(f"env.regs[{i}]", r) for i, r in enumerate(c.array("env.regs", 16)))
    segs = tuple(c.seg(f"env.segs[{i}]", s) for i, s in enumerate(c.array("env.segs", 6)))
    return X86CPUState(
        index=dev.instance_id, regs=regs, rip=c.u64("env.eip"), rflags=c.u64("env.eflags"),
        segs=segs, ldt=c.seg("env.ldt"), tr=c.seg("env.tr"), gdt=c.seg("env.gdt"),
        idt=c.seg("env.idt"),
        cr=(c.u64("env.cr[0]"), 0, c.u64("env.cr[2]"), c.u64("env.cr[3]"), c.u64("env.cr[4]")),
        efer=c.u64("env.efer"), kernel_gs_base=c.u64("env.kernelgsbase"),
        hflags=c.u64("env.hflags"))
